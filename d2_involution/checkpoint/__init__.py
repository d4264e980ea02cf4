"""Checkpoint formats: the officially released RedNets, and Detectron2 weights files.

``convert_official_checkpoint(src, dst)`` reads an official file (mmcls classifier, mmdet Faster /
Mask R-CNN / RetinaNet, mmseg semantic FPN / UPerNet, PaddleClas ``.pdparams``), recognises the
network, renames and re-lays-out its tensors and writes a file that Detectron2's
``DetectionCheckpointer`` loads into the matching d2_involution model. The command line is
``tools/convert_official_weights.py``; conventions are documented in ``docs/official_weights.md``.

``export_backbone`` writes a trained classifier's RedNet for detector initialisation and
``load_backbone_weights`` loads such a file, reporting what did not fit (docs/classification.md).
"""

from .convert import (
    TARGETS,
    ConversionReport,
    anchor_permutation,
    convert_official_checkpoint,
    convert_state_dict,
)
from .detectron2_file import (
    BackboneFit,
    backbone_state_dict,
    export_backbone,
    load_backbone_weights,
    save_detectron2_checkpoint,
)
from .formats import OfficialSource, detect_source, read_official_file

__all__ = [
    "TARGETS",
    "BackboneFit",
    "ConversionReport",
    "OfficialSource",
    "anchor_permutation",
    "backbone_state_dict",
    "convert_official_checkpoint",
    "convert_state_dict",
    "detect_source",
    "export_backbone",
    "load_backbone_weights",
    "read_official_file",
    "save_detectron2_checkpoint",
]
