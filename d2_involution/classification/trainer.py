"""The classification trainer: Detectron2's ``DefaultTrainer`` with a classification data path.

Reused from Detectron2 as they are: the config system, ``launch`` (multi-GPU / multi-machine DDP),
``default_setup``, ``DetectionCheckpointer`` + ``PeriodicCheckpointer`` (``--resume``), the
``LRScheduler`` hook with ``WarmupCosineLR`` (fvcore param schedulers), ``EvalHook``, and the
``CommonMetricPrinter`` (with ETA) / ``JSONWriter`` / ``TensorboardXWriter`` writers.

Added: :class:`AccumulatingTrainer` (a ``SimpleTrainer`` whose step sums the gradients of
``SOLVER.CLS.ACCUMULATION_STEPS`` micro-batches, optionally under AMP), top-k evaluation and the
resumable data order. The command line (set-up, ``--eval-only``, ``--export-backbone``) is
``tools/train_cls.py``.
"""

import contextlib
import logging
import time
from collections import OrderedDict
from typing import Any, Dict, Iterable, Optional, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.engine import DefaultTrainer, SimpleTrainer
from detectron2.evaluation import inference_context, print_csv_format
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch.nn.parallel import DistributedDataParallel

from .. import compat
from ..solver import build_optimizer
from .data import ResumableTrainLoader, build_cls_test_loader, build_cls_train_loader

__all__ = ["AccumulatingTrainer", "ClassificationTrainer", "evaluate_classifier"]

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
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        """``build_model(cfg)`` (a ``RedNetClassifier``), logged by its size, not its layers."""
        model = build_model(cfg)
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
        return compat.last_eval_results(self)

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
