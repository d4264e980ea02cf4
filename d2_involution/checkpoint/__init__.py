"""Conversion of the officially released RedNet checkpoints (OpenMMLab, PaddleClas).

``convert_official_checkpoint(src, dst)`` reads an official file (mmcls classifier, mmdet Faster /
Mask R-CNN / RetinaNet, mmseg semantic FPN / UPerNet, PaddleClas ``.pdparams``), recognises the
network, renames and re-lays-out its tensors and writes a file that Detectron2's
``DetectionCheckpointer`` loads into the matching d2_involution model. The command line is
``tools/convert_official_weights.py``; conventions are documented in ``docs/official_weights.md``.
"""

from .convert import (
    TARGETS,
    ConversionReport,
    anchor_permutation,
    convert_official_checkpoint,
    convert_state_dict,
    save_detectron2_checkpoint,
)
from .formats import STAGE_BLOCKS, OfficialSource, detect_source, read_official_file

__all__ = [
    "TARGETS",
    "STAGE_BLOCKS",
    "ConversionReport",
    "OfficialSource",
    "anchor_permutation",
    "convert_official_checkpoint",
    "convert_state_dict",
    "detect_source",
    "read_official_file",
    "save_detectron2_checkpoint",
]
