"""Built-in datasets (synthetic shapes) and their registration with Detectron2.

Importing this package registers ``shapes_train``, ``shapes_val``, ``shapes_sem_seg_train`` and
``shapes_sem_seg_val``; see :mod:`d2_involution.data.builtin` and docs/datasets.md.
"""

from .builtin import SHAPES_DEFAULTS, prepare_shapes_split, register_all_shapes, shapes_split_params
from .shapes import (
    IGNORE_LABEL,
    SEM_SEG_CLASSES,
    SHAPE_CLASSES,
    generate_shapes_classification,
    generate_shapes_split,
    render_shapes_scene,
)

__all__ = [
    "IGNORE_LABEL",
    "SEM_SEG_CLASSES",
    "SHAPE_CLASSES",
    "SHAPES_DEFAULTS",
    "generate_shapes_classification",
    "generate_shapes_split",
    "prepare_shapes_split",
    "register_all_shapes",
    "render_shapes_scene",
    "shapes_split_params",
]

register_all_shapes()
