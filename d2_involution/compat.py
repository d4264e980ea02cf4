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
detectron2 main still reports ``__version__ == "0.6"``. ``HAS_COMPILED_OPS`` says whether the real
``_C`` is there (e.g. ``COCOEvaluator(..., use_fast_impl=HAS_COMPILED_OPS)``).

Also here, and nowhere else: the few uses of detectron2's private API, each with the reason no
public call does it (reading a checkpoint as ``DetectionCheckpointer.load`` does without loading
it, that load's incompatible keys, a trainer's last evaluation results).
"""

import importlib
import importlib.util
import logging
import os
import sys
import types
from typing import Any, List, Optional

__all__ = [
    "HAS_COMPILED_OPS",
    "describe_gaps",
    "last_eval_results",
    "load_checkpoint_into_model",
    "read_checkpoint_file",
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
            "source to use them. COCO evaluation works with COCOEvaluator(..., "
            "use_fast_impl=False) (train_net.py does that for you)."
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


def _setup() -> None:
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


HAS_COMPILED_OPS = False
_setup()


def describe_gaps() -> List[str]:
    """What the installed detectron2 cannot do, one line each (empty when nothing is missing)."""
    return list(_GAPS)


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


def load_checkpoint_into_model(checkpointer: Any, checkpoint: dict) -> Any:
    """Load a checkpoint read by :func:`read_checkpoint_file` as ``checkpointer.load`` would, and
    return its ``IncompatibleKeys`` (missing, unexpected, incorrectly shaped).

    ``checkpointer.load`` logs these but returns only the non-model entries; a caller that reports
    what did not fit needs them, so its two private steps are called here (same on every version).
    ``checkpoint["model"]`` is consumed.
    """
    incompatible = checkpointer._load_model(checkpoint)
    checkpointer._log_incompatible_keys(incompatible)
    return incompatible


def last_eval_results(trainer: Any) -> Optional[dict]:
    """The results of a ``DefaultTrainer``'s last evaluation (after ``train()``: the final one), or
    None when it evaluated nothing.

    ``DefaultTrainer`` keeps them in a private attribute and returns them from ``train()`` only when
    ``TEST.EXPECTED_RESULTS`` is set; reading the attribute avoids evaluating a second time.
    """
    return getattr(trainer, "_last_eval_results", None)
