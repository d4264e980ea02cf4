"""The RedNet ImageNet-style classification trainer (see docs/classification.md).

``tools/train_cls.py`` is its command line; importing this package registers
:class:`RedNetClassifier` as a Detectron2 meta-architecture and the ``shapes-pretrained://``
weights (:mod:`.shapes_pretrained`). Exporting a trained classifier's
backbone for the detection configs is :func:`d2_involution.checkpoint.export_backbone`.
"""

from .config import add_classification_config, get_cls_cfg, scale_solver_to_actual_batch
from .data import ImageFolderClassification, build_cls_test_loader, build_cls_train_loader
from .model import RedNetClassifier
from .shapes_pretrained import SHAPES_PRETRAINED_PREFIX, shapes_pretrained_backbone
from .trainer import AccumulatingTrainer, ClassificationTrainer, evaluate_classifier

__all__ = [
    "AccumulatingTrainer",
    "ClassificationTrainer",
    "ImageFolderClassification",
    "RedNetClassifier",
    "SHAPES_PRETRAINED_PREFIX",
    "add_classification_config",
    "build_cls_test_loader",
    "build_cls_train_loader",
    "evaluate_classifier",
    "get_cls_cfg",
    "scale_solver_to_actual_batch",
    "shapes_pretrained_backbone",
]
