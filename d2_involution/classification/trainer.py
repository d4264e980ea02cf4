"""The classification trainer: Detectron2's ``DefaultTrainer`` with a classification data path.

Reused from Detectron2 as they are: the config system, ``launch`` (multi-GPU / multi-machine DDP),
``default_setup``, ``DetectionCheckpointer`` + ``PeriodicCheckpointer`` (``--resume``), the
``LRScheduler`` hook with ``WarmupCosineLR`` (fvcore param schedulers), ``EvalHook``, and the
``CommonMetricPrinter`` (with ETA) / ``JSONWriter`` / ``TensorboardXWriter`` writers.

Added: :class:`AccumulatingTrainer` (a ``SimpleTrainer`` whose step sums the gradients of
``SOLVER.CLS.ACCUMULATION_STEPS`` micro-batches, optionally under AMP), top-k evaluation, the
batch/LR/iteration resolution of :func:`~.config.scale_solver_to_actual_batch`, and
``--export-backbone``.
"""

import argparse
import contextlib
import logging
import os
import time
from collections import OrderedDict
from typing import Any, Dict, Iterable, Optional, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.engine import (
    DefaultTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
)
from detectron2.evaluation import inference_context, print_csv_format
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ..modeling.rednet import build_rednet
from .config import get_cls_cfg, scale_solver_to_actual_batch
from .data import (
    ResumableTrainLoader,
    build_cls_test_loader,
    build_cls_train_loader,
    count_train_images_and_classes,
    resolve_dataset_root,
)
from .export import backbone_state_dict, export_backbone
from .model import build_classifier

__all__ = [
    "AccumulatingTrainer",
    "ClassificationTrainer",
    "argument_parser",
    "evaluate_classifier",
    "main",
    "setup",
]

logger = logging.getLogger(__name__)


class AccumulatingTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose step runs ``accumulation_steps`` micro-batches, then one update.

    Each micro-batch loss is divided by ``accumulation_steps``, so the update equals one on the
    concatenated batch (BatchNorm statistics stay per micro-batch, as per GPU in DDP). Under DDP
    gradients are all-reduced only on the last micro-batch. ``amp=True`` runs forward passes in
    float16 autocast with a ``GradScaler`` (CUDA only).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        *,
        accumulation_steps: int = 1,
        amp: bool = False,
    ):
        super().__init__(model, data_loader, optimizer)
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        self.accumulation_steps = accumulation_steps
        self.amp = amp
        self.grad_scaler = torch.amp.GradScaler("cuda") if amp else None

    def run_step(self) -> None:
        assert self.model.training, "[AccumulatingTrainer] model was changed to eval mode!"
        k = self.accumulation_steps
        self.optimizer.zero_grad(set_to_none=True)
        data_time = 0.0
        totals: Dict[str, torch.Tensor] = {}
        for micro in range(k):
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time += time.perf_counter() - start
            no_sync = micro < k - 1 and isinstance(self.model, DistributedDataParallel)
            with self.model.no_sync() if no_sync else contextlib.nullcontext():
                with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                    loss_dict = self.model(data)
                    losses = sum(loss_dict.values()) / k
                if self.grad_scaler is not None:
                    self.grad_scaler.scale(losses).backward()
                else:
                    losses.backward()
            for name, value in loss_dict.items():
                totals[name] = totals.get(name, 0.0) + value.detach() / k
        self._write_metrics(totals, data_time)
        skipped = getattr(self.data_loader, "num_skipped", 0)
        if skipped:
            get_event_storage().put_scalar("skipped_images", skipped, smoothing_hint=False)
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def state_dict(self) -> Dict[str, Any]:
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


def evaluate_classifier(
    model: torch.nn.Module, data_loader: Iterable, topk: Sequence[int] = (1, 5)
) -> Dict[str, float]:
    """Top-k accuracies (percent) over all processes' shares of the validation set.

    Returns ``{"top1": ..., "top5": ..., "num_images": readable images, "skipped_images": ...}``;
    ``top{k}`` with k above the number of classes counts every image as correct.
    """
    topk = tuple(int(k) for k in topk)
    if not topk or min(topk) < 1:
        raise ValueError(f"topk must be positive ints, got {topk}")
    correct = [0] * len(topk)
    total = skipped = 0
    with inference_context(model), torch.no_grad():
        for batch in data_loader:
            skipped += batch["num_skipped"]
            if not len(batch["label"]):
                continue
            logits = model(batch)
            labels = batch["label"].to(logits.device)
            maxk = min(max(topk), logits.shape[1])
            hits = logits.topk(maxk, dim=1).indices == labels[:, None]
            for j, k in enumerate(topk):
                correct[j] += int(hits[:, : min(k, maxk)].any(dim=1).sum())
            total += len(labels)
    gathered = comm.all_gather((correct, total, skipped))
    correct = [sum(g[0][j] for g in gathered) for j in range(len(topk))]
    total = sum(g[1] for g in gathered)
    skipped = sum(g[2] for g in gathered)
    if total == 0:
        raise ValueError(f"evaluation: no readable validation images ({skipped} unreadable)")
    if skipped:
        logger.warning(f"Evaluation skipped {skipped} unreadable images")
    results = {f"top{k}": 100.0 * c / total for k, c in zip(topk, correct)}
    results.update(num_images=float(total), skipped_images=float(skipped))
    return results


class ClassificationTrainer(DefaultTrainer):
    """``DefaultTrainer`` for ``RedNetClassifier`` on an ImageNet-style folder.

    Its checkpoints also hold the data-order seed, so ``--resume`` continues the same sample
    stream, with the same augmentations, from the saved iteration.
    """

    def __init__(self, cfg: CfgNode):
        super().__init__(cfg)
        if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
            raise ValueError(
                f"SOLVER.AMP.ENABLED needs MODEL.DEVICE 'cuda', got {cfg.MODEL.DEVICE!r}"
            )
        self._trainer = AccumulatingTrainer(
            self._trainer.model,
            self._trainer.data_loader,
            self._trainer.optimizer,
            accumulation_steps=cfg.SOLVER.CLS.ACCUMULATION_STEPS,
            amp=cfg.SOLVER.AMP.ENABLED,
        )

    @property
    def train_loader(self) -> ResumableTrainLoader:
        return self._trainer.data_loader

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        model = build_classifier(cfg, cfg.MODEL.CLS.NUM_CLASSES)
        num_params = sum(p.numel() for p in model.parameters())
        logger.info(f"RedNet-{cfg.MODEL.REDNET.DEPTH} classifier, {num_params} parameters")
        return model

    @classmethod
    def build_train_loader(cls, cfg: CfgNode) -> ResumableTrainLoader:
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        return build_cls_train_loader(cfg, seed=seed)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: Optional[str] = None):
        return build_cls_test_loader(cfg)

    @classmethod
    def test(cls, cfg: CfgNode, model: torch.nn.Module, evaluators=None) -> "OrderedDict":
        """Top-1/top-5 on ``DATASETS.CLS.VAL_SPLIT``, as ``{"classification": {...}}``."""
        results = OrderedDict(
            classification=evaluate_classifier(model, cls.build_test_loader(cfg), cfg.TEST.CLS.TOPK)
        )
        if comm.is_main_process():
            logger.info(
                f"Evaluation results on {cfg.DATASETS.CLS.ROOT} ({cfg.DATASETS.CLS.VAL_SPLIT}):"
            )
            print_csv_format(results)
        return results

    def resume_or_load(self, resume: bool = True) -> None:
        super().resume_or_load(resume=resume)
        self.train_loader.start_iter = self.start_iter

    def train(self) -> Optional["OrderedDict"]:
        super().train()
        if self.train_loader.num_skipped:
            logger.warning(f"Unreadable training images skipped: {self.train_loader.num_skipped}")
        return getattr(self, "_last_eval_results", None)

    # DefaultTrainer's state includes the optimizer and AMP scaler (on v0.6 through
    # d2_involution.compat); the loader's seed is added so a resumed run sees the same batches.
    def state_dict(self) -> Dict[str, Any]:
        ret = super().state_dict()
        ret["data_seed"] = self.train_loader.seed
        return ret

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "data_seed" in state_dict:
            self.train_loader.seed = state_dict["data_seed"]


def argument_parser() -> argparse.ArgumentParser:
    """Detectron2's ``default_argument_parser`` plus ``--export-backbone``, ``--export-prefix``."""
    parser = default_argument_parser(
        epilog="Examples:\n"
        "  train:  tools/train_cls.py --config-file configs/Shapes-Classification/rednet26.yaml\n"
        "  eval:   tools/train_cls.py --config-file CFG --eval-only MODEL.WEIGHTS model_final.pth\n"
        "  export: tools/train_cls.py --config-file CFG --export-backbone rednet_d2.pth "
        "MODEL.WEIGHTS model_final.pth\n"
    )
    parser.add_argument(
        "--export-backbone",
        default="",
        metavar="OUT",
        help="write the backbone of MODEL.WEIGHTS to OUT (.pth/.pkl) for detection MODEL.WEIGHTS",
    )
    parser.add_argument(
        "--export-prefix",
        default="",
        help="prefix for exported names ('' = Detectron2 suffix matching; 'backbone.bottom_up.' "
        "= exact names of FPN detectors)",
    )
    return parser


def setup(args: argparse.Namespace) -> CfgNode:
    """Config from file and command line, resolved (classes, batch, LR, iterations) and frozen."""
    cfg = get_cls_cfg()
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    rank = comm.get_rank()
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=rank, name="d2_involution")
    if getattr(args, "export_backbone", ""):
        cfg.freeze()
        return cfg
    training = not args.eval_only
    if training or cfg.MODEL.CLS.NUM_CLASSES == 0:
        num_images, num_classes = count_train_images_and_classes(cfg)
        if cfg.MODEL.CLS.NUM_CLASSES == 0:
            cfg.MODEL.CLS.NUM_CLASSES = num_classes
        elif cfg.MODEL.CLS.NUM_CLASSES != num_classes:
            raise ValueError(
                f"MODEL.CLS.NUM_CLASSES is {cfg.MODEL.CLS.NUM_CLASSES} but the training folder of "
                f"{cfg.DATASETS.CLS.ROOT!r} has {num_classes} classes"
            )
        if training:
            scale_solver_to_actual_batch(cfg, comm.get_world_size(), num_images)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def _export(cfg: CfgNode, output: str, prefix: str) -> Dict[str, torch.Tensor]:
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("--export-backbone needs the trained classifier in MODEL.WEIGHTS")
    r, inv = cfg.MODEL.REDNET, cfg.MODEL.INVOLUTION
    state = backbone_state_dict(cfg.MODEL.WEIGHTS)
    expected = build_rednet(
        r.DEPTH,
        stem_involution_kernel=r.STEM_INVOLUTION_KERNEL,
        norm=r.NORM,
        out_features=["res5"],
        kernel_size=inv.KERNEL_SIZE,
        group_channels=inv.GROUP_CHANNELS,
        reduction_ratio=inv.REDUCTION_RATIO,
        stem_out_channels=r.STEM_OUT_CHANNELS,
        res2_out_channels=r.RES2_OUT_CHANNELS,
    ).state_dict()
    wrong = [k for k in expected if k not in state or tuple(state[k].shape) != expected[k].shape]
    extra = [k for k in state if k not in expected]
    if wrong or extra:
        raise ValueError(
            f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS!r} is not a RedNet-{r.DEPTH} classifier of this "
            f"config: missing/mis-shaped {wrong[:5]}, unexpected {extra[:5]}"
        )
    if comm.is_main_process():
        return export_backbone(cfg.MODEL.WEIGHTS, output, prefix=prefix)
    return {}


def main(args: argparse.Namespace) -> Any:
    """Train, evaluate (``--eval-only``) or export (``--export-backbone``) as the arguments say."""
    cfg = setup(args)
    if args.export_backbone:
        return _export(cfg, args.export_backbone, args.export_prefix)
    if args.eval_only:
        resolve_dataset_root(cfg.DATASETS.CLS.ROOT)
        model = ClassificationTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return ClassificationTrainer.test(cfg, model)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    trainer = ClassificationTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()
