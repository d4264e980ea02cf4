"""Learning-rate schedules: Detectron2's, plus the poly schedule used for semantic segmentation.

Neither detectron2 v0.6 nor main has a poly schedule in core (it lives in the DeepLab project), and
the official RedNet segmentation models (mmseg) train with ``lr = base * (1 - it / max_it) ** 0.9``.
"""

import math

import torch
from detectron2.config import CfgNode
from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler
from fvcore.common.param_scheduler import ParamScheduler

__all__ = ["PolyParamScheduler", "build_lr_scheduler"]


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
