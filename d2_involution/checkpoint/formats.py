"""Reading the official RedNet checkpoint files and recognising what they contain.

Two file formats are read:

* OpenMMLab ``.pth`` (mmcls / mmdet / mmseg, what the official d-li14/involution release is):
  ``torch.save({"meta": ..., "state_dict": ..., ["optimizer": ...]})``; a bare state dict and a
  ``module.``-prefixed (DataParallel) one are accepted too.
* PaddleClas ``.pdparams``: ``paddle.save`` of a dygraph state dict, i.e. a pickled dict of numpy
  arrays; read with :mod:`pickle` (numpy only, no Paddle needed).

:func:`detect_source` then names the network from the keys alone (see :class:`OfficialSource`).
"""

import io
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from ..modeling.rednet import REDNET_DEPTHS

__all__ = ["OfficialSource", "read_official_file", "detect_source"]


@dataclass
class OfficialSource:
    """What an official checkpoint holds, recognised from its keys.

    ``framework``: "mmcls", "mmdet", "mmseg", "paddle" or "openmmlab" (backbone-only file).
    ``arch``: one of "classifier", "backbone", "faster_rcnn", "mask_rcnn", "retinanet",
    "semantic_fpn", "upernet". ``neck``/``head``: "conv", "involution" or None.
    """

    framework: str
    arch: str
    depth: int
    stem_kernel: int
    neck: Optional[str] = None
    head: Optional[str] = None
    num_classes: Optional[int] = None
    num_anchors: Optional[int] = None
    extras: Dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        parts = [f"{self.framework} {self.arch}", f"RedNet-{self.depth}"]
        parts.append(f"stem involution {self.stem_kernel}x{self.stem_kernel}")
        if self.neck:
            parts.append(f"{self.neck} neck")
        if self.head:
            parts.append(f"{self.head} heads")
        if self.num_classes is not None:
            parts.append(f"{self.num_classes} classes")
        return ", ".join(parts)


def _to_tensor(value: Any, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (int, float, np.number)):
        return torch.tensor(value)
    raise ValueError(
        f"checkpoint: entry {key!r} is a {type(value).__name__}, expected a tensor or an array"
    )


def _looks_like_zip_or_pickle(head: bytes) -> bool:
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def read_official_file(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], str]:
    """Read ``path``; return (state dict of CPU tensors, meta, container format).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the problem for a
    file that is not a checkpoint, a truncated/corrupt file, or a file without a state dict.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint path must be a str or PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no such file {path!r}")
    with open(path, "rb") as f:
        data = f.read()
    if len(data) == 0:
        raise ValueError(f"checkpoint: {path!r} is empty (0 bytes), not a checkpoint")
    if not _looks_like_zip_or_pickle(data[:8]):
        raise ValueError(
            f"checkpoint: {path!r} is not a checkpoint (expected a torch .pth zip/pickle or a "
            f"pickled .pdparams, the file starts with {data[:16]!r})"
        )
    try:
        obj = _unpickle(path, data)
    except _NotOnlyTensors as e:
        raise ValueError(f"checkpoint: {path!r}: {e}") from None
    return _split_checkpoint(obj, path)


def _split_checkpoint(obj: Any, path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], str]:
    """(state dict of CPU tensors, meta, container format) of an unpickled checkpoint."""
    if not isinstance(obj, dict):
        raise ValueError(
            f"checkpoint: {path!r} holds a {type(obj).__name__}, expected a dict "
            "(OpenMMLab {'meta', 'state_dict'} or a state dict)"
        )
    meta: Dict[str, Any] = {}
    container = "state_dict"
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        meta = obj.get("meta") or {}
        sd = obj["state_dict"]
        container = "openmmlab"
    elif "model" in obj and isinstance(obj["model"], dict):
        raise ValueError(
            f"checkpoint: {path!r} looks like a Detectron2 checkpoint ({{'model': ...}}), not an "
            "official OpenMMLab/PaddleClas one; load it with DetectionCheckpointer directly"
        )
    else:
        sd = obj
        if sd and all(isinstance(v, np.ndarray) for v in sd.values() if not _is_paddle_meta(v)):
            container = "pdparams"
    state = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise ValueError(f"checkpoint: {path!r} has a non-string key {k!r}")
        if _is_paddle_meta(v):  # e.g. "StructuredToParameterName@@": a dict of names
            meta[k] = v
            continue
        state[k[len("module.") :] if k.startswith("module.") else k] = _to_tensor(v, k)
    if not state:
        raise ValueError(f"checkpoint: {path!r} contains no tensors")
    return state, meta, container


def _is_paddle_meta(value: Any) -> bool:
    return isinstance(value, (dict, str))


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only (a .pdparams file is a pickle: never
    let it import anything else)."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # how protocol 2 (paddle.save's default) pickles bytes
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not an array or a dict)")


class _NotOnlyTensors(ValueError):
    pass


def _numpy_globals() -> list:
    """numpy objects OpenMMLab metadata may hold (scalars, dtypes, arrays).

    The array and scalar reconstructors are taken from how numpy pickles its own objects, so the
    module they live in (``numpy.core`` before numpy 2, ``numpy._core`` since) does not matter.
    """
    reconstruct = np.ndarray((0,)).__reduce__()[0]
    scalar = np.float32(0).__reduce__()[0]
    found = [np.ndarray, np.dtype, reconstruct, scalar]
    found += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "bool")]
    return found


def _torch_load(data: bytes) -> Any:
    """``torch.load`` that only unpickles tensors, containers, strings, numbers and numpy data
    (never arbitrary objects: a checkpoint is a pickle)."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first:
        if "weights_only" not in str(first) and "Weights only" not in str(first):
            raise
        try:
            with torch.serialization.safe_globals(_numpy_globals()):
                return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise _NotOnlyTensors(
                "the file holds Python objects other than tensors, containers and numpy data, "
                f"which are not loaded for safety ({str(e).splitlines()[0]})"
            ) from None


def _unpickle(path: str, data: bytes) -> Any:
    problem = None
    if data.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                bad = z.testzip()
            if bad is not None:
                problem = f"member {bad!r} fails its CRC check"
        except zipfile.BadZipFile as e:
            problem = f"broken zip container ({e})"
        if problem is None:
            try:
                return _torch_load(data)
            except _NotOnlyTensors:
                raise
            except Exception as e:  # noqa: B902  torch raises many types for bad files
                problem = f"{type(e).__name__}: {e}"
    else:
        try:
            obj = _SafeUnpickler(io.BytesIO(data)).load()
        except Exception as e:  # noqa: B902  pickle raises many types for bad files
            obj, problem = None, f"{type(e).__name__}: {e}"
        if isinstance(obj, dict):
            return obj
        try:  # legacy (non-zip) torch.save files start with a pickled magic number
            return _torch_load(data)
        except _NotOnlyTensors:
            raise
        except Exception as e:  # noqa: B902
            problem = problem or f"{type(e).__name__}: {e}"
    raise ValueError(
        f"checkpoint: {path!r} cannot be read ({problem}); the file is truncated or corrupt"
    )


# ------------------------------------------------------------------------------------------------
# Recognising the network
# ------------------------------------------------------------------------------------------------
def _block_counts(keys, prefix: str) -> Tuple[int, ...]:
    counts = []
    for stage in range(1, 5):
        pat = re.compile(rf"^{re.escape(prefix)}layer{stage}\.(\d+)\.conv1\.weight$")
        idx = [int(m.group(1)) for k in keys for m in [pat.match(k)] if m]
        counts.append(max(idx) + 1 if idx else 0)
    return tuple(counts)


def _depth_from_counts(counts: Tuple[int, ...], where: str) -> int:
    for depth, blocks in REDNET_DEPTHS.items():
        if counts == tuple(blocks):
            return depth
    raise ValueError(
        f"checkpoint: {where} has {counts} blocks in layer1..layer4, which is no official RedNet "
        f"(known: {', '.join(f'{d}: {tuple(b)}' for d, b in REDNET_DEPTHS.items())})"
    )


def _unknown_layout(sd: Dict[str, torch.Tensor]) -> ValueError:
    sample = ", ".join(sorted(sd)[:6])
    return ValueError(
        "checkpoint: unknown layout: expected an official RedNet checkpoint (mmcls/mmdet/mmseg "
        "keys "
        "'backbone.stem.*', 'backbone.layer1.*', ... or PaddleClas keys 'stem.*', 'layer1.*'); "
        f"got {len(sd)} tensors such as {sample}"
    )


def _has_prefix(sd: Dict[str, torch.Tensor], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in sd)


def _backbone_of(sd: Dict[str, torch.Tensor]) -> Tuple[str, int, int]:
    """(key prefix, depth, stem involution kernel) of the RedNet in ``sd``."""
    if "backbone.stem.0.conv.weight" in sd:
        prefix = "backbone."
    elif "stem.0.conv.weight" in sd and "layer1.0.conv1.weight" in sd:
        prefix = ""
    else:
        raise _unknown_layout(sd)
    depth = _depth_from_counts(_block_counts(list(sd), prefix), "the backbone")
    kgen = sd.get(prefix + "stem.1.conv2.conv.weight")
    if kgen is None:
        raise _unknown_layout(sd)
    k2 = kgen.shape[0] // 2  # the stem involution has 32 channels = 2 groups of 16
    stem_kernel = int(round(k2**0.5))
    if stem_kernel * stem_kernel != k2:
        raise ValueError(
            f"checkpoint: stem involution kernel generator has {kgen.shape[0]} outputs, expected "
            "2*K*K for an odd K (18 for the classifiers' K=3, 98 for the detectors' K=7)"
        )
    return prefix, depth, stem_kernel


def _neck_of(sd: Dict[str, torch.Tensor]) -> Optional[str]:
    if "neck.fpn_convs.0.conv1.conv.weight" in sd:
        return "involution"
    if "neck.fpn_convs.0.conv.weight" in sd:
        return "conv"
    if _has_prefix(sd, "neck."):
        sample = sorted(k for k in sd if k.startswith("neck."))[:3]
        raise ValueError(
            "checkpoint: unknown neck layout: 'neck.*' has neither FPN ('neck.fpn_convs.0.conv.*') "
            f"nor involution FPN ('neck.fpn_convs.0.conv1.*') keys, e.g. {sample}"
        )
    return None


def _two_stage_source(
    sd: Dict[str, torch.Tensor], depth: int, stem_kernel: int, neck: Optional[str]
) -> OfficialSource:
    head = "involution" if "rpn_head.rpn_conv.conv1.conv.weight" in sd else "conv"
    cls = sd.get("roi_head.bbox_head.fc_cls.weight")
    if cls is None:
        raise ValueError(
            "checkpoint: two-stage detector without 'roi_head.bbox_head.fc_cls.weight'"
        )
    arch = "mask_rcnn" if _has_prefix(sd, "roi_head.mask_head.") else "faster_rcnn"
    mask_inv = "roi_head.mask_head.convs.0.0.conv1.conv.weight" in sd
    if arch == "mask_rcnn" and mask_inv != (head == "involution"):
        raise ValueError(
            "checkpoint: RPN and mask heads disagree (one involution, one convolution); "
            "no official model has that layout"
        )
    return OfficialSource(
        "mmdet",
        arch,
        depth,
        stem_kernel,
        neck=neck,
        head=head,
        num_classes=cls.shape[0] - 1,
        num_anchors=sd["rpn_head.rpn_cls.weight"].shape[0],
    )


def _retinanet_source(
    sd: Dict[str, torch.Tensor], depth: int, stem_kernel: int, neck: Optional[str]
) -> OfficialSource:
    num_anchors = sd["bbox_head.retina_reg.weight"].shape[0] // 4
    num_classes = sd["bbox_head.retina_cls.weight"].shape[0] // num_anchors
    return OfficialSource(
        "mmdet",
        "retinanet",
        depth,
        stem_kernel,
        neck=neck,
        head="conv",
        num_classes=num_classes,
        num_anchors=num_anchors,
    )


def _segmentation_source(
    sd: Dict[str, torch.Tensor], depth: int, stem_kernel: int, neck: Optional[str]
) -> OfficialSource:
    n = sd["decode_head.conv_seg.weight"].shape[0]
    if _has_prefix(sd, "decode_head.scale_heads."):
        return OfficialSource("mmseg", "semantic_fpn", depth, stem_kernel, neck=neck, num_classes=n)
    if _has_prefix(sd, "decode_head.psp_modules."):
        return OfficialSource("mmseg", "upernet", depth, stem_kernel, neck=neck, num_classes=n)
    raise ValueError(
        "checkpoint: unknown mmseg decode head: expected FPNHead ('decode_head.scale_heads.*') "
        "or UPerHead ('decode_head.psp_modules.*')"
    )


def detect_source(sd: Dict[str, torch.Tensor], container: str = "state_dict") -> OfficialSource:
    """Recognise the official network behind a state dict (raises ``ValueError`` if unknown)."""
    prefix, depth, stem_kernel = _backbone_of(sd)
    if prefix == "":
        if "stem.0.bn._mean" not in sd and container != "pdparams":
            raise _unknown_layout(sd)
        fc = sd.get("fc.weight")
        num_classes = None if fc is None else fc.shape[1]
        return OfficialSource("paddle", "classifier", depth, stem_kernel, num_classes=num_classes)
    neck = _neck_of(sd)
    if _has_prefix(sd, "rpn_head.") and _has_prefix(sd, "roi_head."):
        return _two_stage_source(sd, depth, stem_kernel, neck)
    if "bbox_head.retina_cls.weight" in sd:
        return _retinanet_source(sd, depth, stem_kernel, neck)
    if "decode_head.conv_seg.weight" in sd:
        return _segmentation_source(sd, depth, stem_kernel, neck)
    if "head.fc.weight" in sd:
        num_classes = sd["head.fc.weight"].shape[0]
        return OfficialSource("mmcls", "classifier", depth, stem_kernel, num_classes=num_classes)
    if neck is None and all(k.startswith("backbone.") for k in sd):
        return OfficialSource("openmmlab", "backbone", depth, stem_kernel)
    raise _unknown_layout(sd)
