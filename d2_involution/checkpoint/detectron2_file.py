"""Detectron2 weights files: the one writer, a classifier's backbone export, and its loading.

Every file this package writes (converted official checkpoints, exported backbones) is
``{"model": {name: tensor}, "__author__": "d2_involution", "matching_heuristics": bool, ...}``,
what ``DetectionCheckpointer`` (``MODEL.WEIGHTS``) loads, written by
:func:`save_detectron2_checkpoint`.

Exported backbones (:func:`export_backbone`), for any d2_involution detection/segmentation config:

* Default (``prefix=""``, heuristics on): names are the backbone's own (``stem.*``,
  ``res2.*``..``res5.*``) and Detectron2's ``DetectionCheckpointer`` maps each one onto the model
  key that ends with it (``backbone.bottom_up.res2...`` in FPN models, ``backbone.res2...`` in C4
  models); any architecture with a RedNet backbone works.
* ``prefix="backbone.bottom_up."`` (heuristics off): names are already the model's, loaded as-is
  by plain ``state_dict`` matching (FPN and RetinaNet configs only).

The classifiers use a 3x3 stem involution, the official detectors a 7x7 one: the stem involution's
kernel-generating conv (``stem.involution.conv2.conv.{weight,bias}``: 9*G vs 49*G output
channels) cannot be loaded and Detectron2 names it in its log; every other tensor loads.
"""

import logging
import os
import pickle
import tempfile
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager
from torch import nn

from .. import compat

__all__ = [
    "BackboneFit",
    "backbone_state_dict",
    "export_backbone",
    "load_backbone_weights",
    "save_detectron2_checkpoint",
]

logger = logging.getLogger(__name__)


def save_detectron2_checkpoint(
    path: str,
    state_dict: Mapping[str, torch.Tensor],
    *,
    matching_heuristics: bool,
    extra: Optional[Dict[str, Any]] = None,
) -> str:
    """Write ``{"model": state_dict, "__author__", "matching_heuristics", **extra}`` to ``path``.

    ``.pkl``: pickled numpy arrays (the Detectron2 model-zoo format); otherwise ``torch.save``.
    Atomic (a temporary file in the same folder, then a rename): a failure never leaves a partial
    file at ``path`` nor replaces what was there. Missing parent folders are created.
    """
    pkl = path.endswith(".pkl")
    payload = {
        "model": OrderedDict((k, v.numpy() if pkl else v) for k, v in state_dict.items()),
        "__author__": "d2_involution",
        "matching_heuristics": bool(matching_heuristics),
    }
    payload.update(extra or {})
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=os.path.splitext(path)[1], dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            if pkl:
                pickle.dump(payload, f)
            else:
                torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


ClassifierLike = Union[nn.Module, Mapping[str, Any], str]


def _classifier_state(classifier: ClassifierLike) -> Mapping[str, torch.Tensor]:
    if isinstance(classifier, nn.Module):
        return classifier.state_dict()
    if isinstance(classifier, str):
        with PathManager.open(classifier, "rb") as f:
            loaded = torch.load(f, map_location="cpu", weights_only=False)
        classifier = loaded
    if not isinstance(classifier, Mapping):
        raise TypeError(
            "classifier: expected a RedNetClassifier, a state dict or a checkpoint path, got "
            f"{type(classifier).__name__}"
        )
    if "model" in classifier and isinstance(classifier["model"], Mapping):
        classifier = classifier["model"]
    elif "state_dict" in classifier and isinstance(classifier["state_dict"], Mapping):
        classifier = classifier["state_dict"]
    return classifier


def backbone_state_dict(classifier: ClassifierLike) -> "OrderedDict[str, torch.Tensor]":
    """The ``backbone.*`` tensors of a classifier with the ``backbone.`` prefix removed.

    ``classifier``: a ``RedNetClassifier``, its state dict, or a checkpoint file of one (the
    trainer's ``{"model": ...}`` files included). ``fc.*`` is dropped; any other key is an error.
    A ``module.`` prefix (saved from DistributedDataParallel) is removed first.
    """
    state = _classifier_state(classifier)
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    other = []
    for key, value in state.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if name.startswith("backbone."):
            out[name[len("backbone.") :]] = torch.as_tensor(value).detach().cpu()
        elif not name.startswith("fc."):
            other.append(key)
    if not out:
        raise ValueError(
            "classifier: no 'backbone.*' keys found (expected a RedNetClassifier state dict); "
            f"first keys: {list(state)[:5]}"
        )
    if other:
        raise ValueError(
            f"classifier: keys outside 'backbone.*' and 'fc.*' would be lost: {other[:5]}"
            f"{' ...' if len(other) > 5 else ''}"
        )
    return out


def export_backbone(
    classifier: ClassifierLike,
    output_path: str,
    *,
    prefix: str = "",
    matching_heuristics: Optional[bool] = None,
) -> Dict[str, torch.Tensor]:
    """Write a classifier's backbone as a Detectron2 weights file; returns the written tensors.

    ``output_path`` ends in ``.pth`` (torch) or ``.pkl`` (pickled numpy arrays, the Detectron2
    model-zoo format). ``prefix`` is prepended to every name; ``matching_heuristics`` defaults to
    ``prefix == ""`` (see the module docstring). Detectors must normalise inputs as the classifier
    did: ``INPUT.FORMAT: RGB``, ``MODEL.PIXEL_MEAN: [123.675, 116.28, 103.53]``,
    ``MODEL.PIXEL_STD: [58.395, 57.12, 57.375]`` (the d2_involution RedNet configs do).
    BatchNorm ``num_batches_tracked`` counters are left out: Detectron2's ``FrozenBatchNorm2d`` has
    none, and a trainable BatchNorm restarts its counter at 0.
    """
    if not isinstance(output_path, str) or not output_path.endswith((".pth", ".pkl")):
        raise ValueError(f"output_path must end in .pth or .pkl, got {output_path!r}")
    if not isinstance(prefix, str) or (prefix and not prefix.endswith(".")):
        raise ValueError(f"prefix must be '' or end with '.', got {prefix!r}")
    if matching_heuristics is None:
        matching_heuristics = prefix == ""
    state = OrderedDict(
        (prefix + k, v)
        for k, v in backbone_state_dict(classifier).items()
        if not k.endswith("num_batches_tracked")
    )
    save_detectron2_checkpoint(output_path, state, matching_heuristics=matching_heuristics)
    num_params = sum(v.numel() for k, v in state.items() if not k.endswith(("_mean", "_var")))
    logger.info(
        f"Wrote {len(state)} backbone tensors ({num_params} parameters) to {output_path} "
        f"(prefix {prefix!r}, matching_heuristics={bool(matching_heuristics)}). Load it with "
        "MODEL.WEIGHTS; detectors need INPUT.FORMAT RGB and the ImageNet PIXEL_MEAN/PIXEL_STD."
    )
    return state


class BackboneFit(NamedTuple):
    """What loading a backbone file into a model did.

    ``not_fitting``: (checkpoint name, checkpoint shape, model name, model shape) of tensors whose
    name has a place in the model but whose shape differs (not loaded). ``unused``: checkpoint
    names with no place in the model. ``loaded``: model names that received a tensor.
    """

    not_fitting: List[Tuple[str, Tuple[int, ...], str, Tuple[int, ...]]]
    unused: List[str]
    loaded: List[str]


def load_backbone_weights(model: nn.Module, path: str) -> BackboneFit:
    """Load ``path`` into ``model`` exactly as ``DetectionCheckpointer(model).load(path)`` does
    (heuristic matching included, and the same log), and return what did and did not fit."""
    checkpointer = DetectionCheckpointer(model)
    checkpoint = compat.read_checkpoint_file(checkpointer, path)
    names = list(checkpoint["model"].keys())
    shapes = {k: tuple(v.shape) for k, v in checkpoint["model"].items()}
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    heuristics = bool(checkpoint.get("matching_heuristics", False))
    incompatible = compat.load_checkpoint_into_model(checkpointer, checkpoint)

    not_fitting, unused = [], []
    for key, shape_ckpt, shape_model in incompatible.incorrect_shapes:
        not_fitting.append((key, tuple(shape_ckpt), key, tuple(shape_model)))
    for key in incompatible.unexpected_keys:
        targets = [k for k in model_shapes if heuristics and (k == key or k.endswith("." + key))]
        targets = [k for k in targets if model_shapes[k] != shapes.get(key)]
        if key in shapes and targets:
            target = max(targets, key=len)
            not_fitting.append((key, shapes[key], target, model_shapes[target]))
        else:
            unused.append(key)
    missing = set(incompatible.missing_keys) | {t[2] for t in not_fitting}
    rejected = {t[0] for t in not_fitting} | set(unused)
    accepted = [n for n in names if n not in rejected]
    loaded = sorted(
        k
        for k in model_shapes
        if k not in missing and any(k == n or k.endswith("." + n) for n in accepted)
    )
    if not_fitting:
        logger.warning(
            "Backbone weights that do not fit this model (not loaded): "
            + "; ".join(f"{a} {b} -> {c} {d}" for a, b, c, d in not_fitting)
        )
    logger.info(
        f"Loaded {len(names) - len(rejected)} of {len(names)} tensors from {path}; "
        f"{len(not_fitting)} did not fit, {len(unused)} unused"
    )
    return BackboneFit(not_fitting, unused, loaded)
