"""Every difference between the detectron2 versions we support, in one place.

Supported: detectron2 main (built from source, with its compiled ``detectron2._C``) and the official
v0.6 Python sources as shipped by the ``pb1-detectron2==0.6`` package, which has no ``_C`` and
predates numpy 2, Pillow 10 and setuptools 81. Importing this module (``import d2_involution`` does
it first) makes the v0.6 fallback usable on today's libraries; each fix is engaged only where the
installed detectron2 actually needs it, so on detectron2 main this module changes nothing.

Fixes applied when needed:

* ``detectron2._C`` missing: a stand-in module is installed whose every attribute raises a clear
  ``RuntimeError`` naming the compiled op. None of this project's models needs ``_C`` (ROIAlign and
  NMS come from torchvision); deformable/rotated ops and the fast COCO evaluator do.
* ``PIL.Image.LINEAR`` (removed in Pillow 10; a default argument in v0.6's transforms).
* ``np.bool/np.int/np.float/np.str`` (removed in numpy 1.24; v0.6's SemSegEvaluator uses them).
* ``pkg_resources`` (removed with setuptools 81; ``model_zoo`` imports it, on main too).
* ``detectron2.export`` importing caffe2 unconditionally (v0.6; PyTorch 2 has no caffe2), which
  breaks ``detectron2.utils.analysis``: the package is provided as on main, with caffe2 optional
  (``TracingAdapter`` and the TorchScript helpers, no Caffe2 export).
* ``DefaultTrainer`` checkpoints without the optimizer (v0.6 saves only the iteration and hooks,
  so ``--resume`` lost SGD momentum and the AMP scaler): it gets main's ``state_dict`` /
  ``load_state_dict``, which add the inner trainer's state.

Each is keyed on what the installed detectron2's source uses (read, not imported), because
detectron2 main still reports ``__version__ == "0.6"``.

Also here: helpers whose right call differs between versions (the COCO evaluator).
"""

import importlib
import importlib.util
import logging
import os
import sys
import types
from typing import Any, List

__all__ = [
    "DETECTRON2_VERSION",
    "HAS_COMPILED_OPS",
    "describe_gaps",
    "build_coco_evaluator",
    "read_checkpoint_file",
    "stock_detectron2_config",
]

logger = logging.getLogger(__name__)

_GAPS: List[str] = []


class _MissingCompiledOps(types.ModuleType):
    """Stand-in for ``detectron2._C``: any use raises an error that says what is missing.

    The build-information queries that ``detectron2.utils.collect_env`` (called by
    ``default_setup``, i.e. every ``train_net.py`` run) makes answer "not built" instead.
    """

    def get_compiler_version(self) -> str:
        return "not built (detectron2._C missing)"

    def get_cuda_version(self) -> str:
        return "not built (detectron2._C missing)"

    def has_cuda(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(
            f"detectron2._C.{name} is not available: this detectron2 was installed without its "
            "compiled extension (pb1-detectron2==0.6 ships no C++/CUDA sources). Deformable "
            "convolution, rotated boxes and the fast COCO evaluator need it; build detectron2 from "
            "source to use them. COCO evaluation works with use_fast_impl=False "
            "(d2_involution.compat.build_coco_evaluator does that for you)."
        )


def _install_missing_c_standin(d2: types.ModuleType) -> bool:
    """Return True when the real compiled ops are present; install the stand-in otherwise."""
    try:
        spec = importlib.util.find_spec("detectron2._C")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        try:
            importlib.import_module("detectron2._C")
            return True
        except ImportError as e:
            logger.warning("detectron2._C is present but does not load (%s); using a stand-in", e)
    standin = _MissingCompiledOps("detectron2._C")
    standin.__file__ = None
    sys.modules["detectron2._C"] = standin
    d2._C = standin
    _GAPS.append(
        "detectron2._C (compiled ops: deformable conv, rotated boxes, fast COCO eval); "
        "ROIAlign/NMS come from torchvision, COCO eval uses pycocotools"
    )
    return False


def _patch_pillow() -> None:
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR


def _patch_numpy_aliases() -> None:
    import numpy as np

    for name, value in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if name not in np.__dict__:
            setattr(np, name, value)


def _install_pkg_resources_standin() -> None:
    """v0.6's model_zoo uses only ``pkg_resources.resource_filename``; provide that if missing."""
    if importlib.util.find_spec("pkg_resources") is not None:
        return
    import importlib.resources as resources

    def resource_filename(package: str, resource: str) -> str:
        return str(resources.files(package).joinpath(resource))

    standin = types.ModuleType("pkg_resources")
    standin.resource_filename = resource_filename
    sys.modules["pkg_resources"] = standin


def _source_uses(d2: types.ModuleType, module: str, *tokens: str) -> bool:
    """Whether a detectron2 module's source mentions any token, read without importing it.

    detectron2 main still calls itself 0.6, so fixes are keyed on what the code uses, not on
    the version string. (Importing the module to look would fail on the very thing we fix.)
    """
    parts = module.split(".")[1:]
    path = os.path.join(os.path.dirname(d2.__file__), *parts) + ".py"
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        source = f.read()
    return any(t in source for t in tokens)


def _patch_default_trainer_state() -> None:
    """Give v0.6's DefaultTrainer main's checkpointed state: iteration, hooks and inner trainer."""
    from detectron2.engine import DefaultTrainer
    from detectron2.engine.train_loop import TrainerBase

    if DefaultTrainer.state_dict is not TrainerBase.state_dict:
        return

    def state_dict(self) -> dict:
        ret = TrainerBase.state_dict(self)
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        TrainerBase.load_state_dict(self, state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("Checkpoint has no optimizer state (written by detectron2 v0.6)")

    DefaultTrainer.state_dict = state_dict
    DefaultTrainer.load_state_dict = load_state_dict


def _install_export_without_caffe2(d2: types.ModuleType) -> None:
    """Provide ``detectron2.export`` without its Caffe2 part, loading submodules on demand."""
    if importlib.util.find_spec("caffe2") is not None or "detectron2.export" in sys.modules:
        return
    path = os.path.join(os.path.dirname(d2.__file__), "export")
    export = types.ModuleType("detectron2.export", "detectron2.export without Caffe2 (compat)")
    export.__path__ = [path]
    export.__file__ = os.path.join(path, "__init__.py")
    lazy = {
        "TracingAdapter": "flatten",
        "dump_torchscript_IR": "torchscript",
        "scripting_with_instances": "torchscript",
    }

    def __getattr__(name: str) -> Any:
        if name in lazy:
            return getattr(importlib.import_module(f"detectron2.export.{lazy[name]}"), name)
        raise AttributeError(
            f"detectron2.export.{name} is not available: detectron2 v0.6's Caffe2 export needs "
            "caffe2, which PyTorch 2 no longer ships"
        )

    export.__getattr__ = __getattr__
    sys.modules["detectron2.export"] = export
    d2.export = export
    _GAPS.append("detectron2.export's Caffe2 export (caffe2 is not in PyTorch 2)")


def _setup() -> str:
    import detectron2

    global HAS_COMPILED_OPS
    HAS_COMPILED_OPS = _install_missing_c_standin(detectron2)
    if _source_uses(detectron2, "detectron2.data.transforms.transform", "Image.LINEAR"):
        _patch_pillow()
    if _source_uses(
        detectron2, "detectron2.evaluation.sem_seg_evaluation", "np.int)", "np.float)"
    ) or _source_uses(detectron2, "detectron2.evaluation.pascal_voc_evaluation", "np.bool)"):
        _patch_numpy_aliases()
    if _source_uses(detectron2, "detectron2.model_zoo.model_zoo", "import pkg_resources"):
        _install_pkg_resources_standin()
    if _source_uses(detectron2, "detectron2.export.__init__", "\nfrom .api import *"):
        _install_export_without_caffe2(detectron2)
    _patch_default_trainer_state()
    return getattr(detectron2, "__version__", "unknown")


HAS_COMPILED_OPS = False
DETECTRON2_VERSION = _setup()


def describe_gaps() -> List[str]:
    """What the installed detectron2 cannot do, one line each (empty when nothing is missing)."""
    return list(_GAPS)


def build_coco_evaluator(dataset_name: str, output_dir: str = None, **kwargs: Any):
    """A ``COCOEvaluator`` that works on every supported detectron2.

    The fast (C++) COCO evaluation needs ``detectron2._C``; without it the official pycocotools
    path is used, which gives the same numbers.
    """
    from detectron2.evaluation import COCOEvaluator

    if not HAS_COMPILED_OPS:
        kwargs["use_fast_impl"] = False
    return COCOEvaluator(dataset_name, output_dir=output_dir, **kwargs)


def read_checkpoint_file(checkpointer: Any, path: str) -> dict:
    """What ``checkpointer.load(path)`` would load into the model, without loading it.

    ``DetectionCheckpointer._load_file`` reads .pth/.pkl files the Detectron2 way; detectron2 main
    requires it to run inside ``load`` (it reads ``?matching_heuristics=True`` from the URL then),
    v0.6 does not. Callers that need to inspect a checkpoint before loading use this.
    """
    if not hasattr(checkpointer, "_parsed_url_during_load"):
        return checkpointer._load_file(path)
    from urllib.parse import urlparse

    checkpointer._parsed_url_during_load = urlparse(path)
    try:
        local = checkpointer._parsed_url_during_load._replace(query="").geturl()
        return checkpointer._load_file(checkpointer.path_manager.get_local_path(local))
    finally:
        checkpointer._parsed_url_during_load = None


# Detectron2's model-zoo settings for the stock R-50-FPN baselines: the keys of Base-RCNN-FPN.yaml /
# Base-RetinaNet.yaml plus the R-50 1x files. The v0.6 fallback package ships no model-zoo yaml
# files, so they are set here (the same values on every version).
_BASE_RCNN_FPN = [
    ("MODEL.META_ARCHITECTURE", "GeneralizedRCNN"),
    ("MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone"),
    ("MODEL.RESNETS.DEPTH", 50),
    ("MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"]),
    ("MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"]),
    ("MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64], [128], [256], [512]]),
    ("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[0.5, 1.0, 2.0]]),
    ("MODEL.RPN.IN_FEATURES", ["p2", "p3", "p4", "p5", "p6"]),
    ("MODEL.RPN.PRE_NMS_TOPK_TRAIN", 2000),
    ("MODEL.RPN.PRE_NMS_TOPK_TEST", 1000),
    ("MODEL.RPN.POST_NMS_TOPK_TRAIN", 1000),
    ("MODEL.RPN.POST_NMS_TOPK_TEST", 1000),
    ("MODEL.ROI_HEADS.NAME", "StandardROIHeads"),
    ("MODEL.ROI_HEADS.IN_FEATURES", ["p2", "p3", "p4", "p5"]),
    ("MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead"),
    ("MODEL.ROI_BOX_HEAD.NUM_FC", 2),
    ("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7),
    ("MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead"),
    ("MODEL.ROI_MASK_HEAD.NUM_CONV", 4),
    ("MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", 14),
]
_BASE_RETINANET = [
    ("MODEL.META_ARCHITECTURE", "RetinaNet"),
    ("MODEL.BACKBONE.NAME", "build_retinanet_resnet_fpn_backbone"),
    ("MODEL.RESNETS.DEPTH", 50),
    ("MODEL.RESNETS.OUT_FEATURES", ["res3", "res4", "res5"]),
    ("MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"]),
    (
        "MODEL.ANCHOR_GENERATOR.SIZES",
        [[x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [32, 64, 128, 256, 512]],
    ),
    ("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[0.5, 1.0, 2.0]]),
    ("MODEL.RETINANET.IOU_THRESHOLDS", [0.4, 0.5]),
    ("MODEL.RETINANET.IOU_LABELS", [0, -1, 1]),
    ("MODEL.RETINANET.SMOOTH_L1_LOSS_BETA", 0.0),
]
_STOCK_CONFIGS = {
    "faster_rcnn_R_50_FPN_1x": _BASE_RCNN_FPN + [("MODEL.MASK_ON", False)],
    "mask_rcnn_R_50_FPN_1x": _BASE_RCNN_FPN + [("MODEL.MASK_ON", True)],
    "retinanet_R_50_FPN_1x": _BASE_RETINANET,
}


def stock_detectron2_config(name: str):
    """Detectron2's default config set up as its model-zoo R-50-FPN baseline ``name``.

    ``name``: "faster_rcnn_R_50_FPN_1x", "mask_rcnn_R_50_FPN_1x" or "retinanet_R_50_FPN_1x".
    ``MODEL.WEIGHTS`` is left empty (random init; nothing is downloaded).
    """
    from detectron2.config import get_cfg

    if name not in _STOCK_CONFIGS:
        raise ValueError(f"name: expected one of {sorted(_STOCK_CONFIGS)}, got {name!r}")
    cfg = get_cfg()
    for key, value in _STOCK_CONFIGS[name]:
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, value)
    cfg.MODEL.WEIGHTS = ""
    return cfg
