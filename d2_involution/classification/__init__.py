"""The RedNet ImageNet-style classification trainer (see docs/classification.md).

``tools/train_cls.py`` is its entry point; :func:`export_backbone` turns a trained classifier into
a Detectron2 weights file for the detection and segmentation configs.
"""

from .config import add_classification_config, get_cls_cfg, scale_solver_to_actual_batch
from .data import ImageFolderClassification, build_cls_test_loader, build_cls_train_loader
from .export import BackboneFit, backbone_state_dict, export_backbone, load_backbone_weights
from .model import RedNetClassifier, build_classifier
from .trainer import (
    AccumulatingTrainer,
    ClassificationTrainer,
    argument_parser,
    evaluate_classifier,
    main,
    setup,
)

__all__ = [
    "AccumulatingTrainer",
    "BackboneFit",
    "ClassificationTrainer",
    "ImageFolderClassification",
    "RedNetClassifier",
    "add_classification_config",
    "argument_parser",
    "backbone_state_dict",
    "build_classifier",
    "build_cls_test_loader",
    "build_cls_train_loader",
    "evaluate_classifier",
    "export_backbone",
    "get_cls_cfg",
    "load_backbone_weights",
    "main",
    "scale_solver_to_actual_batch",
    "setup",
]
