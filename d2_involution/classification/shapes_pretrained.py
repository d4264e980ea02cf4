"""Backbones pre-trained on the built-in shapes classification folder, trained on first use.

``MODEL.WEIGHTS: "shapes-pretrained://rednet26"`` names the RedNet backbone that the recipe
``configs/Shapes-Classification/rednet26.yaml`` trains: the shapes counterpart of an ImageNet
backbone, for the Shapes configs that fine-tune from one (as COCO and Cityscapes models start from
ImageNet). The first load trains that classifier in this process (the trainer of
``tools/train_cls.py``), exports its backbone with :func:`d2_involution.checkpoint.export_backbone`
and caches it under ``$DETECTRON2_DATASETS/shapes/pretrained/<name>/`` with the training log and
the final top-1; later loads read the cache. The cache is keyed by the whole merged recipe, so an
edited recipe is trained again; it is written once, atomically, under a lock, like the shapes data.
The global random states are restored afterwards, so a run that pre-trains continues exactly as one
that found the cache.
"""

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator

from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.file_io import PathManager
from iopath.common.file_io import PathHandler

from ..checkpoint import export_backbone
from ..data.loaders import global_rng_state, set_global_rng_state
from ..data.shapes import datasets_root, generate_once
from .config import get_cls_cfg
from .data import resolve_classes_and_batch
from .trainer import ClassificationTrainer

__all__ = ["SHAPES_PRETRAINED_PREFIX", "ShapesPretrainedHandler", "shapes_pretrained_backbone"]

logger = logging.getLogger(__name__)

SHAPES_PRETRAINED_PREFIX = "shapes-pretrained://"
#: Where the recipes live: ``configs/Shapes-Classification/<name>.yaml`` of this source tree.
RECIPE_DIR = Path(__file__).resolve().parents[2] / "configs" / "Shapes-Classification"
BACKBONE_FILE = "backbone.pth"
_LOGGERS = ("detectron2", "d2_involution", "fvcore")


def _recipe_config(name: str) -> Any:
    """The merged classification config of recipe ``name``, its output folder unset."""
    path = RECIPE_DIR / f"{name}.yaml"
    if not name or "/" in name or not path.is_file():
        known = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")) if RECIPE_DIR.is_dir() else []
        raise ValueError(
            f"{SHAPES_PRETRAINED_PREFIX}{name}: no recipe {path} (known: {known}); this needs the "
            "d2_involution source tree, or pre-train by hand with tools/train_cls.py "
            "--export-backbone and pass the file as MODEL.WEIGHTS"
        )
    cfg = get_cls_cfg()
    cfg.merge_from_file(str(path))
    cfg.OUTPUT_DIR = ""
    return cfg


def _train_and_export(name: str, cfg: Any, out: Path) -> None:
    """Train the classifier of recipe ``name`` in ``out/train``; export its backbone to ``out``."""
    if comm.get_world_size() > 1:
        raise RuntimeError(
            f"{SHAPES_PRETRAINED_PREFIX}{name} is not cached yet and this is a "
            f"{comm.get_world_size()}-process run: pre-train it once in a single process (load it "
            "in a 1-GPU or CPU run), or set MODEL.WEIGHTS to a file written by tools/train_cls.py "
            "--export-backbone"
        )
    cfg.OUTPUT_DIR = str(out / "train")
    resolve_classes_and_batch(cfg, world_size=1, training=True)
    os.makedirs(cfg.OUTPUT_DIR)
    saved = global_rng_state()
    try:
        with _logging_to(os.path.join(cfg.OUTPUT_DIR, "log.txt")):
            seed_all_rng(cfg.SEED)
            trainer = ClassificationTrainer(cfg)
            trainer.resume_or_load(resume=False)
            results = trainer.train() or {}
    finally:
        set_global_rng_state(saved)
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    export_backbone(final, str(out / BACKBONE_FILE))
    for checkpoint in Path(cfg.OUTPUT_DIR).glob("model_*.pth"):
        checkpoint.unlink()
    with open(out / "result.json", "w") as f:
        json.dump({"config": cfg.dump(), "results": _plain(results)}, f, indent=1)


@contextlib.contextmanager
def _logging_to(path: str) -> Iterator[None]:
    """Also write the pre-training's log records to ``path`` while it runs."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    for log in loggers:
        log.addHandler(handler)
    try:
        yield
    finally:
        for log in loggers:
            log.removeHandler(handler)
        handler.close()


def _plain(results: Dict) -> Dict:
    return {k: _plain(v) if isinstance(v, dict) else float(v) for k, v in results.items()}


def shapes_pretrained_backbone(name: str) -> str:
    """The cached backbone file of recipe ``name``, pre-training it first when it is missing."""
    cfg = _recipe_config(name)
    recipe = cfg.dump()
    manifest = {
        "kind": "shapes_pretrained_backbone",
        "name": name,
        "recipe_sha256": hashlib.sha256(recipe.encode("utf-8")).hexdigest(),
    }
    target = Path(datasets_root()) / "shapes" / "pretrained" / name

    def build(out: Path) -> None:
        logger.info(f"Pre-training {SHAPES_PRETRAINED_PREFIX}{name} (first use) for {target}")
        _train_and_export(name, cfg.clone(), out)

    return str(generate_once(target, manifest, build) / BACKBONE_FILE)


class ShapesPretrainedHandler(PathHandler):
    """iopath handler of ``shapes-pretrained://<recipe>``: the local file of that backbone."""

    def _get_supported_prefixes(self):
        return [SHAPES_PRETRAINED_PREFIX]

    def _get_local_path(self, path: str, **kwargs: Any) -> str:
        return shapes_pretrained_backbone(path[len(SHAPES_PRETRAINED_PREFIX) :])

    def _open(self, path: str, mode: str = "r", **kwargs: Any):
        return PathManager.open(self._get_local_path(path), mode, **kwargs)


PathManager.register_handler(ShapesPretrainedHandler())
