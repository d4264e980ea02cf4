"""Optimizer and learning-rate schedule: Detectron2's, plus what the official RedNet runs used.

* Poly schedule: neither detectron2 v0.6 nor main has one in core (it lives in the DeepLab
  project); the official segmentation models (mmseg) use ``lr = base * (1 - it / max_it) ** 0.9``.
* Whole-model gradient clipping: Detectron2's ``CLIP_TYPE: "norm"`` clips each parameter's gradient
  separately, while the official detectors (mmcv ``grad_clip``) clip the norm of all gradients
  together. ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE: "full_model"`` selects the latter (the name
  Detectron2's DeepLab and Mask2Former projects use for the same thing).
"""

import math
from typing import Callable, Optional

import torch
from detectron2.config import CfgNode
from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
from detectron2.solver import build_optimizer as d2_build_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler
from fvcore.common.param_scheduler import ParamScheduler

__all__ = [
    "PolyParamScheduler",
    "build_lr_scheduler",
    "build_optimizer",
    "clip_full_model_gradients",
]


class PolyParamScheduler(ParamScheduler):
    """``(1 - where) ** power``, held at ``constant_ending`` once it would fall below it.

    ``where`` is the training progress in [0, 1). With ``constant_ending == 0`` this is the plain
    poly decay that reaches 0 at the last iteration.
    """

    def __init__(self, power: float = 0.9, constant_ending: float = 0.0):
        if not isinstance(power, (int, float)) or power <= 0 or math.isnan(power):
            raise ValueError(f"PolyParamScheduler: power must be a positive number, got {power!r}")
        if not isinstance(constant_ending, (int, float)) or not 0.0 <= constant_ending < 1.0:
            raise ValueError(
                f"PolyParamScheduler: constant_ending must be in [0, 1), got {constant_ending!r}"
            )
        self.power = float(power)
        self.constant_ending = float(constant_ending)

    def __call__(self, where: float) -> float:
        value = (1.0 - min(max(where, 0.0), 1.0)) ** self.power
        if self.constant_ending > 0 and value < self.constant_ending:
            return self.constant_ending
        return value


def build_lr_scheduler(
    cfg: CfgNode, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler._LRScheduler:
    """Detectron2's ``build_lr_scheduler`` plus ``SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR"``.

    The poly schedule reads ``SOLVER.POLY_LR_POWER`` and ``SOLVER.POLY_LR_CONSTANT_ENDING`` and
    shares Detectron2's warm-up keys (``WARMUP_FACTOR``, ``WARMUP_ITERS``, ``WARMUP_METHOD``).
    """
    if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupPolyLR":
        return d2_build_lr_scheduler(cfg, optimizer)
    max_iter = cfg.SOLVER.MAX_ITER
    if max_iter <= 0:
        raise ValueError(f"SOLVER.MAX_ITER must be positive for WarmupPolyLR, got {max_iter}")
    sched = WarmupParamScheduler(
        PolyParamScheduler(cfg.SOLVER.POLY_LR_POWER, cfg.SOLVER.POLY_LR_CONSTANT_ENDING),
        cfg.SOLVER.WARMUP_FACTOR,
        min(cfg.SOLVER.WARMUP_ITERS / max_iter, 1.0),
        cfg.SOLVER.WARMUP_METHOD,
    )
    return LRMultiplier(optimizer, multiplier=sched, max_iter=max_iter)


def clip_full_model_gradients(
    optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float = 2.0
) -> torch.optim.Optimizer:
    """Make ``optimizer.step()`` first clip the total gradient norm of all its parameters.

    The optimizer is changed in place (its class becomes a subclass whose ``step`` clips) and
    returned; its state dict is unchanged, so checkpoints stay compatible.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer)}")
    if not max_norm > 0:
        raise ValueError(f"max_norm: expected a positive number, got {max_norm!r}")
    base = type(optimizer)

    class _FullModelClipping(base):
        def step(self, closure: Optional[Callable] = None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    _FullModelClipping.__name__ = base.__name__ + "WithFullModelGradientClipping"
    _FullModelClipping.__qualname__ = _FullModelClipping.__name__
    optimizer.__class__ = _FullModelClipping
    return optimizer


OPTIMIZERS = ("SGD", "ADAMW")


def _build_base_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER``: "SGD" is Detectron2's ``build_optimizer``; "ADAMW" is
    ``torch.optim.AdamW`` on the same parameter groups (norm/bias weight decay and LR factors) with
    the same per-parameter clipping, as Detectron2's Panoptic-DeepLab project builds its Adam."""
    name = cfg.SOLVER.OPTIMIZER
    if name == "SGD":
        return d2_build_optimizer(cfg, model)
    if name != "ADAMW":
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {OPTIMIZERS}, got {name!r}")
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
        params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY
    )


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``SOLVER.OPTIMIZER`` names, plus ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE:
    "full_model"``."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not (clip.ENABLED and clip.CLIP_TYPE == "full_model"):
        return _build_base_optimizer(cfg, model)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    optimizer = _build_base_optimizer(cfg, model)
    return clip_full_model_gradients(optimizer, clip.CLIP_VALUE, clip.NORM_TYPE)
