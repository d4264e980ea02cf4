#!/usr/bin/env python
"""Train and evaluate RedNet / involution models with Detectron2.

Detection (Faster/Mask R-CNN, RetinaNet) and semantic segmentation (semantic FPN, UPerNet) share
this script; the evaluator follows the dataset's ``evaluator_type``, semantic segmentation gets its
crop/flip augmentation, and ``SOLVER.LR_SCHEDULER_NAME: WarmupPolyLR`` selects the poly schedule.

    python train_net.py --config-file configs/Shapes/faster_rcnn_rednet26_involution_fpn.yaml
    python train_net.py --config-file CFG --num-gpus 8
    python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
"""

import d2_involution  # isort: skip  # noqa: F401  (first: detectron2 compat + registrations)
import logging
import os
from typing import Any, Dict, List, Optional

import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetMapper, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine import (
    DefaultTrainer,
    HookBase,
    default_argument_parser,
    default_setup,
    hooks,
    launch,
)
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
    verify_results,
)
from detectron2.utils.logger import setup_logger

from d2_involution import add_involution_config, compat
from d2_involution.data.loaders import (
    ResumableTrainLoader,
    build_resumable_train_loader,
    build_skipping_test_loader,
    global_rng_state,
    set_global_rng_state,
)
from d2_involution.solver import build_lr_scheduler, build_optimizer

logger = logging.getLogger("detectron2")

# Evaluated with Detectron2's SemSegEvaluator (mIoU, fwIoU, mACC, pACC). Detectron2's own
# CityscapesSemSegEvaluator needs the cityscapesscripts package and the raw labelIds files; the
# mIoU over the 19 train ids that SemSegEvaluator computes from labelTrainIds.png is the number
# the paper (mmseg) reports.
_SEM_SEG_EVALUATOR_TYPES = ("sem_seg", "cityscapes_sem_seg")


def build_evaluator(
    cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None
) -> DatasetEvaluator:
    """The evaluator for ``dataset_name``, chosen by its metadata's ``evaluator_type``.

    "coco" -> COCO box/mask AP (the pycocotools path when detectron2._C is missing: same numbers);
    "sem_seg" and "cityscapes_sem_seg" -> ``SemSegEvaluator``. Results are written under
    ``output_folder`` (default ``OUTPUT_DIR/inference``).
    """
    if not isinstance(dataset_name, str):
        raise TypeError(f"dataset_name: expected a str, got {type(dataset_name).__name__}")
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    evaluators: List[DatasetEvaluator] = []
    if evaluator_type in _SEM_SEG_EVALUATOR_TYPES:
        evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    if evaluator_type in ("coco", "coco_panoptic_seg"):
        evaluators.append(
            COCOEvaluator(
                dataset_name, output_dir=output_folder, use_fast_impl=compat.HAS_COMPILED_OPS
            )
        )
    if not evaluators:
        raise NotImplementedError(
            f"no evaluator for dataset {dataset_name!r} with evaluator_type {evaluator_type!r}; "
            f"supported: 'coco', {', '.join(map(repr, _SEM_SEG_EVALUATOR_TYPES))}"
        )
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


def build_sem_seg_train_aug(cfg: CfgNode) -> List[T.Augmentation]:
    """Semantic-segmentation training augmentation: resize, category-area-constrained crop, flip.

    Resize with ``INPUT.MIN_SIZE_TRAIN`` / ``MAX_SIZE_TRAIN`` (sampling per
    ``MIN_SIZE_TRAIN_SAMPLING``), crop with ``INPUT.CROP`` when enabled (rejecting crops where one
    class covers more than ``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA``; the ignore label does not
    count), then a horizontal flip with probability 0.5 when ``INPUT.RANDOM_FLIP`` allows it.
    """
    augs: List[T.Augmentation] = [
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    ]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(
            T.RandomCrop_CategoryAreaConstraint(
                cfg.INPUT.CROP.TYPE,
                cfg.INPUT.CROP.SIZE,
                cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            )
        )
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    return augs


class SkippedImagesHook(HookBase):
    """Puts the training loader's count of unreadable images into the EventStorage
    (``skipped_images``, hence metrics.json and TensorBoard) and logs the total at the end."""

    def __init__(self, loader: ResumableTrainLoader):
        self.loader = loader

    def after_step(self) -> None:
        if self.loader.num_skipped:
            self.trainer.storage.put_scalar(
                "skipped_images", self.loader.num_skipped, smoothing_hint=False
            )

    def after_train(self) -> None:
        if self.loader.num_skipped:
            logger.warning(f"Unreadable training images skipped: {self.loader.num_skipped}")


class Trainer(DefaultTrainer):
    """DefaultTrainer plus evaluators by dataset, sem-seg augmentation, poly LR, global clipping,
    exact resume and unreadable images skipped.

    The train loader is :class:`~d2_involution.data.loaders.ResumableTrainLoader`: its position
    and the global random states go into every checkpoint, so ``--resume`` continues with the
    batches, augmentations and sampling draws of the uninterrupted run (bit-identical on CPU).
    """

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = None
        if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
            mapper = DatasetMapper(cfg, is_train=True, augmentations=build_sem_seg_train_aug(cfg))
        return build_resumable_train_loader(cfg, mapper)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_skipping_test_loader(cfg, dataset_name)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @property
    def train_loader(self) -> ResumableTrainLoader:
        return self._trainer.data_loader

    def build_hooks(self) -> List[HookBase]:
        ret = super().build_hooks()
        writers = [i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)]
        ret.insert(writers[0] if writers else len(ret), SkippedImagesHook(self.train_loader))
        return ret

    # DefaultTrainer's state includes the optimizer (on v0.6 through d2_involution.compat) and the
    # hooks' (LR schedule); the loader position and the random states are added.
    def state_dict(self) -> Dict[str, Any]:
        ret = super().state_dict()
        ret["train_loader"] = self.train_loader.state_dict()
        ret["rng"] = global_rng_state()
        return ret

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "train_loader" in state_dict:
            self.train_loader.load_state_dict(state_dict["train_loader"])
            set_global_rng_state(state_dict["rng"])
        else:
            logger.warning("Checkpoint has no data-loader state: the resumed data order differs")


def setup(args):
    """Config from the file and command line, then Detectron2's logging/output-dir set-up."""
    cfg = get_cfg()
    add_involution_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # The library's own messages (e.g. the skipped images) in the console and log.txt too.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2_involution")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # The final evaluation's results (None without a test set), without evaluating again.
    return compat.last_eval_results(trainer)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
