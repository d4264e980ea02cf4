"""Registration of the built-in shapes datasets with Detectron2's catalogs.

Registered names (at ``import d2_involution``; nothing is generated until first use):

* ``shapes_train``, ``shapes_val``: instance detection/segmentation, COCO json with RLE masks,
  loaded by Detectron2's ``load_coco_json``; ``evaluator_type="coco"``. Train with
  ``INPUT.MASK_FORMAT = "bitmask"`` when masks are used.
* ``shapes_sem_seg_train``, ``shapes_sem_seg_val``: the same images with label PNGs
  (0 = background, 1..5 = shapes, ``ignore_label=255``), loaded by ``load_sem_seg``;
  ``evaluator_type="sem_seg"``.

The split is generated into ``$DETECTRON2_DATASETS/shapes/<split>`` (default ./datasets) the first
time its dataset dicts, or its metadata ``json_file``/``image_root``/``sem_seg_root``, are asked
for, so ``COCOEvaluator``/``SemSegEvaluator`` can be built before anything touched the data.
Sizes come from the environment at that moment (defaults in brackets):
``D2INV_SHAPES_TRAIN_IMAGES`` [2000], ``D2INV_SHAPES_VAL_IMAGES`` [100],
``D2INV_SHAPES_IMAGE_SIZE`` [128], ``D2INV_SHAPES_SEED`` [0] (``SHAPES_DEFAULTS``). Changed values
regenerate the split.
"""

import os
from typing import Dict, List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.datasets import load_coco_json, load_sem_seg

from .shapes import (
    IGNORE_LABEL,
    SEM_SEG_CLASSES,
    SHAPE_CLASSES,
    datasets_root,
    generate_shapes_split,
)

__all__ = ["SHAPES_DEFAULTS", "shapes_split_params", "prepare_shapes_split", "register_all_shapes"]

# Default generation parameters of the registered splits.
SHAPES_DEFAULTS: Dict[str, int] = {
    "train_images": 2000,
    "val_images": 100,
    "image_size": 128,
    "seed": 0,
}
_ENV = {
    "train_images": "D2INV_SHAPES_TRAIN_IMAGES",
    "val_images": "D2INV_SHAPES_VAL_IMAGES",
    "image_size": "D2INV_SHAPES_IMAGE_SIZE",
    "seed": "D2INV_SHAPES_SEED",
}
SPLITS = ("train", "val")


def _env_int(key: str) -> int:
    name = _ENV[key]
    raw = os.environ.get(name, "").strip()
    if not raw:
        return SHAPES_DEFAULTS[key]
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def shapes_split_params(split: str) -> Dict[str, object]:
    """Generation arguments of a registered split, from the defaults and the environment."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return {
        "root": os.path.join(datasets_root(), "shapes"),
        "split": split,
        "num_images": _env_int(f"{split}_images"),
        "image_size": _env_int("image_size"),
        "seed": _env_int("seed"),
    }


def prepare_shapes_split(split: str) -> str:
    """Generate the registered split if needed (cheap when present); returns its folder."""
    return generate_shapes_split(**shapes_split_params(split))


class _ShapesMetadata(Metadata):
    """Metadata whose file paths generate the split on first access.

    Only the path attributes are lazy; everything else is plain Detectron2 metadata.
    """

    @property
    def json_file(self) -> str:
        return os.path.join(prepare_shapes_split(self.shapes_split), "instances.json")

    @property
    def image_root(self) -> str:
        return os.path.join(prepare_shapes_split(self.shapes_split), "images")

    @property
    def sem_seg_root(self) -> str:
        return os.path.join(prepare_shapes_split(self.shapes_split), "sem_seg")


def _load_instances(split: str, dataset_name: str) -> List[dict]:
    folder = prepare_shapes_split(split)
    return load_coco_json(
        os.path.join(folder, "instances.json"), os.path.join(folder, "images"), dataset_name
    )


def _load_sem_seg(split: str) -> List[dict]:
    folder = prepare_shapes_split(split)
    dicts = load_sem_seg(
        os.path.join(folder, "sem_seg"), os.path.join(folder, "images"), "png", "png"
    )
    size = shapes_split_params(split)["image_size"]
    for d in dicts:
        d["height"] = d["width"] = size
    return dicts


def _register(name: str, loader, **metadata) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog[name] = _ShapesMetadata(name=name).set(**metadata)


def register_all_shapes() -> None:
    """Register ``shapes_{train,val}`` and ``shapes_sem_seg_{train,val}`` (idempotent)."""
    for split in SPLITS:
        name = f"shapes_{split}"
        _register(
            name,
            lambda s=split, n=name: _load_instances(s, n),
            shapes_split=split,
            thing_classes=list(SHAPE_CLASSES),
            thing_dataset_id_to_contiguous_id={k + 1: k for k in range(len(SHAPE_CLASSES))},
            evaluator_type="coco",
        )
        _register(
            f"shapes_sem_seg_{split}",
            lambda s=split: _load_sem_seg(s),
            shapes_split=split,
            stuff_classes=list(SEM_SEG_CLASSES),
            ignore_label=IGNORE_LABEL,
            evaluator_type="sem_seg",
        )
