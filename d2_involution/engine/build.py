"""Builders that ``train_net.py`` plugs into Detectron2's ``DefaultTrainer``."""

import os
from typing import List, Optional

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators, SemSegEvaluator

from ..compat import build_coco_evaluator

__all__ = ["build_evaluator", "build_sem_seg_train_aug", "SEM_SEG_EVALUATOR_TYPES"]

# Evaluated with Detectron2's SemSegEvaluator (mIoU, fwIoU, mACC, pACC). Detectron2's own
# CityscapesSemSegEvaluator needs the cityscapesscripts package and the raw labelIds files; the
# mIoU over the 19 train ids that SemSegEvaluator computes from labelTrainIds.png is the number
# the paper (mmseg) reports.
SEM_SEG_EVALUATOR_TYPES = ("sem_seg", "cityscapes_sem_seg")


def build_evaluator(
    cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None
) -> DatasetEvaluator:
    """The evaluator for ``dataset_name``, chosen by its metadata's ``evaluator_type``.

    "coco" -> COCO box/mask AP (pycocotools when detectron2._C is missing); "sem_seg" and
    "cityscapes_sem_seg" -> ``SemSegEvaluator``. Results are written under ``output_folder``
    (default ``OUTPUT_DIR/inference``).
    """
    if not isinstance(dataset_name, str):
        raise TypeError(f"dataset_name: expected a str, got {type(dataset_name).__name__}")
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    evaluators: List[DatasetEvaluator] = []
    if evaluator_type in SEM_SEG_EVALUATOR_TYPES:
        evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    if evaluator_type in ("coco", "coco_panoptic_seg"):
        evaluators.append(build_coco_evaluator(dataset_name, output_dir=output_folder))
    if not evaluators:
        raise NotImplementedError(
            f"no evaluator for dataset {dataset_name!r} with evaluator_type {evaluator_type!r}; "
            f"supported: 'coco', {', '.join(map(repr, SEM_SEG_EVALUATOR_TYPES))}"
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
