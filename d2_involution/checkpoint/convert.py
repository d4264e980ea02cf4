"""Official RedNet checkpoints -> Detectron2 checkpoints of the matching d2_involution model.

Name mapping (official -> ours; see also the module docs of ``modeling.rednet``, ``fpn``,
``rpn_head``, ``mask_head`` and ``upernet_head``):

==========================================  ======================================================
official                                    d2_involution
==========================================  ======================================================
``backbone.stem.{0,1,2,4}``                 ``<B>stem.{conv1,involution,bn,conv2}``
``backbone.layer{i}.*``                     ``<B>res{i+1}.*``
``neck.lateral_convs.{i}.conv``             ``backbone.fpn_lateral{i+s0}`` (s0 2; RetinaNet 3)
``neck.fpn_convs.{i}[.conv]``               ``backbone.fpn_output{i+s0}`` (conv or Involution)
``neck.fpn_convs.{3,4}.conv`` (RetinaNet)   ``backbone.top_block.p6`` / ``p7``
``rpn_head.rpn_conv``                       ``proposal_generator.rpn_head.conv[.involution]``
``rpn_head.rpn_cls`` / ``rpn_reg``          ``proposal_generator.rpn_head.objectness_logits`` /
                                            ``anchor_deltas``
``roi_head.bbox_head.shared_fcs.{0,1}``     ``roi_heads.box_head.fc1`` / ``fc2``
``roi_head.bbox_head.fc_cls`` / ``fc_reg``  ``roi_heads.box_predictor.cls_score`` / ``bbox_pred``
``roi_head.mask_head.convs.{i}[.0]``        ``roi_heads.mask_head.mask_fcn{i+1}[.involution]``
``roi_head.mask_head.upsample``             ``roi_heads.mask_head.deconv``
``roi_head.mask_head.conv_logits``          ``roi_heads.mask_head.predictor``
``bbox_head.{cls,reg}_convs.{i}.conv``      ``head.{cls,bbox}_subnet.{2i}``
``bbox_head.retina_cls`` / ``retina_reg``   ``head.cls_score`` / ``bbox_pred`` (anchors permuted)
``decode_head.scale_heads.{i}.{2j}``        ``sem_seg_head.p{i+2}.{2j}`` (``bn`` -> ``norm``)
``decode_head.psp_modules`` / ``bottleneck``  ``sem_seg_head.psp.stages`` / ``psp.bottleneck``
``decode_head.{lateral,fpn}_convs`` etc.    ``sem_seg_head.{lateral,fpn}_convs``, ``fpn_bottleneck``
``decode_head.conv_seg``                    ``sem_seg_head.predictor``
``auxiliary_head.convs`` / ``conv_seg``     ``sem_seg_head.aux_convs`` / ``aux_predictor``
``head.fc`` (mmcls), ``fc`` (PaddleClas)    ``fc`` (RedNetClassifier; Paddle's (in, out) transposed)
==========================================  ======================================================

``<B>`` is ``backbone.bottom_up.`` under an FPN, ``backbone.`` for UPerNet and the classifier.
Layouts that agree need no change but are checked (see ``docs/official_weights.md``): mmdet 2.x
and Detectron2 both put the background last in ``cls_score`` (K+1), both lay the class-specific
box deltas out class-major (4*K, (dx, dy, dw, dh) per class), and the RPN's one-scale, three-ratio
anchors are in the same order. RetinaNet's nine anchors per location are not: mmdet enumerates them
ratio-major (index r * S + s) and Detectron2 size-major (s * R + r), so the head's output channels
are permuted.
"""

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .detectron2_file import export_backbone, save_detectron2_checkpoint
from .formats import OfficialSource, detect_source, read_official_file

__all__ = [
    "TARGETS",
    "ConversionReport",
    "anchor_permutation",
    "convert_state_dict",
    "convert_official_checkpoint",
]

#: what a conversion may produce: "auto" (the source's own model; backbone weights for a
#: classifier), "model", "backbone" (RedNet weights for any config), "classifier".
TARGETS = ("auto", "model", "backbone", "classifier")

Tensor = torch.Tensor


@dataclass
class ConversionReport:
    """What a conversion did; ``summary()`` is what the command line prints."""

    source: OfficialSource
    target: str
    converted: List[Tuple[str, str]] = field(default_factory=list)
    no_counterpart: List[str] = field(default_factory=list)
    shape_mismatch: List[str] = field(default_factory=list)
    transforms: List[str] = field(default_factory=list)
    dropped_buffers: int = 0
    missing_in_checkpoint: List[str] = field(default_factory=list)
    dst: Optional[str] = None
    config_hint: Optional[str] = None
    class_order: Optional[str] = None

    def summary(self) -> str:
        lines = [f"source: {self.source.describe()}", f"target: {self.target}"]
        lines.append(f"converted: {len(self.converted)} tensors")
        if self.dropped_buffers:
            lines.append(
                f"dropped: {self.dropped_buffers} BatchNorm 'num_batches_tracked' counters "
                "(unused by Detectron2; PyTorch re-creates them on load)"
            )
        for t in self.transforms:
            lines.append(f"transformed: {t}")
        lines.append(f"no counterpart ({len(self.no_counterpart)}):")
        lines.extend(f"  {k}" for k in self.no_counterpart)
        lines.append(f"shape mismatch ({len(self.shape_mismatch)}):")
        lines.extend(f"  {k}" for k in self.shape_mismatch)
        if self.missing_in_checkpoint:
            lines.append(
                "not in the checkpoint, keep their initialisation "
                f"({len(self.missing_in_checkpoint)}):"
            )
            lines.extend(f"  {k}" for k in self.missing_in_checkpoint)
        if self.class_order:
            lines.append(f"class order: {self.class_order}")
        if self.config_hint:
            lines.append(f"evaluate with: {self.config_hint}")
        if self.dst:
            lines.append(f"wrote: {self.dst}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Key mapping
# ------------------------------------------------------------------------------------------------
_STEM = {"0": "conv1", "1": "involution", "2": "bn", "4": "conv2"}
_PADDLE_BN = {"_mean": "running_mean", "_variance": "running_var"}


def _rednet_key(rest: str) -> Optional[str]:
    """Official RedNet-internal name (after ``backbone.``) -> ours, or None."""
    m = re.match(r"^stem\.(\d)\.(.+)$", rest)
    if m:
        return f"stem.{_STEM[m.group(1)]}.{m.group(2)}" if m.group(1) in _STEM else None
    m = re.match(r"^layer([1-4])\.(\d+)\.(.+)$", rest)
    if m:
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.{m.group(3)}"
    return None


def _neck_key(rest: str, s0: int, n_levels: int) -> Optional[str]:
    m = re.match(r"^lateral_convs\.(\d+)\.conv\.(weight|bias)$", rest)
    if m:
        return f"backbone.fpn_lateral{int(m.group(1)) + s0}.{m.group(2)}"
    m = re.match(r"^fpn_convs\.(\d+)\.(.+)$", rest)
    if not m:
        return None
    i, tail = int(m.group(1)), m.group(2)
    if i >= n_levels:  # RetinaNet's extra convs on C5 and P6
        extra = {0: "p6", 1: "p7"}.get(i - n_levels)
        mm = re.match(r"^conv\.(weight|bias)$", tail)
        return f"backbone.top_block.{extra}.{mm.group(1)}" if extra and mm else None
    mm = re.match(r"^conv\.(weight|bias)$", tail)
    if mm:
        return f"backbone.fpn_output{i + s0}.{mm.group(1)}"
    if tail.startswith(("conv1.", "conv2.")):
        return f"backbone.fpn_output{i + s0}.{tail}"
    return None


def _rpn_key(rest: str) -> Optional[str]:
    p = "proposal_generator.rpn_head."
    m = re.match(r"^rpn_conv\.(weight|bias)$", rest)
    if m:
        return f"{p}conv.{m.group(1)}"
    if rest.startswith("rpn_conv.conv"):
        return f"{p}conv.involution.{rest[len('rpn_conv.'):]}"
    for ours, theirs in (("objectness_logits", "rpn_cls"), ("anchor_deltas", "rpn_reg")):
        m = re.match(rf"^{theirs}\.(weight|bias)$", rest)
        if m:
            return f"{p}{ours}.{m.group(1)}"
    return None


def _roi_key(rest: str) -> Optional[str]:
    names = {
        "bbox_head.shared_fcs.0": "roi_heads.box_head.fc1",
        "bbox_head.shared_fcs.1": "roi_heads.box_head.fc2",
        "bbox_head.fc_cls": "roi_heads.box_predictor.cls_score",
        "bbox_head.fc_reg": "roi_heads.box_predictor.bbox_pred",
        "mask_head.upsample": "roi_heads.mask_head.deconv",
        "mask_head.conv_logits": "roi_heads.mask_head.predictor",
    }
    m = re.match(r"^(.+)\.(weight|bias)$", rest)
    if m and m.group(1) in names:
        return f"{names[m.group(1)]}.{m.group(2)}"
    m = re.match(r"^mask_head\.convs\.(\d+)\.conv\.(weight|bias)$", rest)
    if m:
        return f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}.{m.group(2)}"
    m = re.match(r"^mask_head\.convs\.(\d+)\.0\.(conv[12]\..+)$", rest)
    if m:
        return f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}.involution.{m.group(2)}"
    return None


def _retina_key(rest: str) -> Optional[str]:
    m = re.match(r"^(cls|reg)_convs\.(\d+)\.conv\.(weight|bias)$", rest)
    if m:
        sub = "cls_subnet" if m.group(1) == "cls" else "bbox_subnet"
        return f"head.{sub}.{2 * int(m.group(2))}.{m.group(3)}"
    m = re.match(r"^retina_(cls|reg)\.(weight|bias)$", rest)
    if m:
        return f"head.{'cls_score' if m.group(1) == 'cls' else 'bbox_pred'}.{m.group(2)}"
    return None


def _conv_module(tail: str, norm_name: str = "bn") -> Optional[str]:
    """mmcv ConvModule inner names ``conv.weight``/``bn.*`` -> ours (``norm_name`` for ``bn``)."""
    m = re.match(r"^(conv|bn)\.(.+)$", tail)
    if not m:
        return None
    return f"{'conv' if m.group(1) == 'conv' else norm_name}.{m.group(2)}"


def _semantic_fpn_key(rest: str) -> Optional[str]:
    """mmseg FPNHead -> Detectron2 SemSegFPNHead (detectron2 Conv2d: ``weight``, ``norm.*``)."""
    m = re.match(r"^scale_heads\.(\d+)\.(\d+)\.(conv|bn)\.(.+)$", rest)
    if m:
        inner = m.group(4) if m.group(3) == "conv" else f"norm.{m.group(4)}"
        return f"sem_seg_head.p{int(m.group(1)) + 2}.{m.group(2)}.{inner}"
    m = re.match(r"^conv_seg\.(weight|bias)$", rest)
    return f"sem_seg_head.predictor.{m.group(1)}" if m else None


def _upernet_key(rest: str, aux: bool) -> Optional[str]:
    p = "sem_seg_head."
    if aux:
        m = re.match(r"^convs\.(\d+)\.(.+)$", rest)
        if m:
            inner = _conv_module(m.group(2))
            return f"{p}aux_convs.{m.group(1)}.{inner}" if inner else None
        m = re.match(r"^conv_seg\.(weight|bias)$", rest)
        return f"{p}aux_predictor.{m.group(1)}" if m else None
    m = re.match(r"^psp_modules\.(\d+)\.1\.(.+)$", rest)
    if m:
        inner = _conv_module(m.group(2))
        return f"{p}psp.stages.{m.group(1)}.1.{inner}" if inner else None
    m = re.match(r"^(bottleneck|fpn_bottleneck)\.(.+)$", rest)
    if m:
        inner = _conv_module(m.group(2))
        where = "psp.bottleneck" if m.group(1) == "bottleneck" else "fpn_bottleneck"
        return f"{p}{where}.{inner}" if inner else None
    m = re.match(r"^(lateral_convs|fpn_convs)\.(\d+)\.(.+)$", rest)
    if m:
        inner = _conv_module(m.group(3))
        return f"{p}{m.group(1)}.{m.group(2)}.{inner}" if inner else None
    m = re.match(r"^conv_seg\.(weight|bias)$", rest)
    return f"{p}predictor.{m.group(1)}" if m else None


def _backbone_prefix(source: OfficialSource, target: str) -> str:
    if target in ("backbone", "classifier"):
        return "backbone."  # RedNetClassifier names; "backbone" files drop it (export_backbone)
    if source.arch in ("upernet", "classifier", "backbone"):
        return "backbone."
    return "backbone.bottom_up."


def _key_mapper(source: OfficialSource, target: str) -> Callable[[str], Optional[str]]:
    """A function from an official key to our key (None: no counterpart in the target)."""
    bb = _backbone_prefix(source, target)
    head_wanted = target in ("model", "auto") and source.arch not in ("classifier", "backbone")
    s0 = 3 if source.arch == "retinanet" else 2
    n_levels = 3 if source.arch == "retinanet" else 4

    def paddle(key: str) -> Optional[str]:
        if key.startswith("fc."):
            return key if target == "classifier" else None
        for theirs, ours in _PADDLE_BN.items():
            if key.endswith("." + theirs):
                key = key[: -len(theirs)] + ours
        mapped = _rednet_key(key)
        return bb + mapped if mapped else None

    def openmmlab(key: str) -> Optional[str]:
        if key.startswith("backbone."):
            mapped = _rednet_key(key[len("backbone.") :])
            return bb + mapped if mapped else None
        if key.startswith("head.fc."):
            return "fc." + key[len("head.fc.") :] if target == "classifier" else None
        if not head_wanted:
            return None
        if key.startswith("neck."):
            return _neck_key(key[len("neck.") :], s0, n_levels)
        if key.startswith("rpn_head."):
            return _rpn_key(key[len("rpn_head.") :])
        if key.startswith("roi_head."):
            return _roi_key(key[len("roi_head.") :])
        if key.startswith("bbox_head.") and source.arch == "retinanet":
            return _retina_key(key[len("bbox_head.") :])
        if key.startswith("decode_head."):
            rest = key[len("decode_head.") :]
            if source.arch == "semantic_fpn":
                return _semantic_fpn_key(rest)
            return _upernet_key(rest, aux=False)
        if key.startswith("auxiliary_head.") and source.arch == "upernet":
            return _upernet_key(key[len("auxiliary_head.") :], aux=True)
        return None

    return paddle if source.framework == "paddle" else openmmlab


def anchor_permutation(num_anchors: int, num_scales: int) -> List[int]:
    """For each Detectron2 anchor index (size-major: s * R + r), the mmdet anchor index holding the
    same anchor (ratio-major: r * S + s), with S scales (sizes) and R = num_anchors / S ratios."""
    if num_scales < 1 or num_anchors % num_scales != 0:
        raise ValueError(
            f"anchor_permutation: num_anchors ({num_anchors}) must be a multiple of num_scales "
            f"({num_scales})"
        )
    num_ratios = num_anchors // num_scales
    perm = []
    for a in range(num_anchors):
        s, r = divmod(a, num_ratios)
        perm.append(r * num_scales + s)
    return perm


def _permute_anchors(t: Tensor, perm: List[int]) -> Tensor:
    """Reorder the output channels of a head conv laid out (anchor, per-anchor values)."""
    a = len(perm)
    if t.shape[0] % a != 0:
        raise ValueError(f"cannot split {t.shape[0]} output channels into {a} anchors")
    grouped = t.reshape(a, t.shape[0] // a, *t.shape[1:])
    return grouped[torch.tensor(perm)].reshape(t.shape).contiguous()


# ------------------------------------------------------------------------------------------------
# Conversion
# ------------------------------------------------------------------------------------------------
def _resolve_target(source: OfficialSource, target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if target == "auto":
        return "backbone" if source.arch in ("classifier", "backbone") else "model"
    if target == "classifier" and source.arch != "classifier":
        raise ValueError(
            f"target 'classifier' needs an ImageNet classifier checkpoint, got a {source.arch} "
            f"({source.describe()}); use target 'backbone' or 'model'"
        )
    if target == "model" and source.arch in ("classifier", "backbone"):
        return "classifier" if source.arch == "classifier" else "backbone"
    return target


def _rename(
    sd: Dict[str, Tensor], source: OfficialSource, report: "ConversionReport"
) -> Dict[str, Tensor]:
    """Every official tensor under its d2_involution name (Paddle's fc transposed)."""
    mapper = _key_mapper(source, report.target)
    out: Dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            report.dropped_buffers += 1
            continue
        new = mapper(key)
        if new is None:
            report.no_counterpart.append(key)
            continue
        if new in out:
            raise ValueError(f"checkpoint: two official keys map onto {new!r} (second: {key!r})")
        if source.framework == "paddle" and key == "fc.weight":
            value = value.t()
            report.transforms.append("fc.weight: PaddlePaddle Linear (in, out) -> (out, in)")
        out[new] = value.contiguous()
        report.converted.append((key, new))
    return out


def _fit_stem_kernel(
    out: Dict[str, Tensor],
    source: OfficialSource,
    report: "ConversionReport",
    wanted: Optional[int],
) -> None:
    """Leave out a stem kernel generator whose kernel differs from the model's, and say so."""
    target = report.target
    if wanted is None:
        wanted = (
            3 if target == "classifier" else (source.stem_kernel if target == "model" else None)
        )
    if wanted is not None and wanted != source.stem_kernel:
        prefix = _backbone_prefix(source, target)
        for suffix in ("weight", "bias"):
            k = f"{prefix}stem.involution.conv2.conv.{suffix}"
            shape = tuple(out.pop(k).shape)
            want = (2 * wanted * wanted,) + shape[1:]
            report.shape_mismatch.append(
                f"{k}: checkpoint {shape} ({source.stem_kernel}x{source.stem_kernel} stem "
                f"involution) vs model {want} ({wanted}x{wanted}); left out"
            )
        report.converted = [(a, b) for a, b in report.converted if b in out]
    elif source.stem_kernel != 7 and target == "backbone":
        report.shape_mismatch.append(
            f"stem.involution.conv2.conv.weight/bias: {source.stem_kernel}x{source.stem_kernel} "
            "stem involution vs the detection/segmentation configs' 7x7 "
            "(MODEL.REDNET.STEM_INVOLUTION_KERNEL 7): kept in the file for the classifier, skipped "
            "with a warning when loading into a 7x7-stem model (its kernel generator stays "
            "randomly initialised, as in the official detectors)"
        )


def _permute_retinanet_anchors(
    out: Dict[str, Tensor], source: OfficialSource, report: "ConversionReport", num_scales: int
) -> None:
    perm = anchor_permutation(source.num_anchors, num_scales)
    for name in ("head.cls_score", "head.bbox_pred"):
        for suffix in ("weight", "bias"):
            out[f"{name}.{suffix}"] = _permute_anchors(out[f"{name}.{suffix}"], perm)
    report.transforms.append(
        f"head.cls_score/bbox_pred: output channels permuted from mmdet's ratio-major anchor "
        f"order to Detectron2's size-major order ({source.num_anchors} anchors = "
        f"{num_scales} sizes x {source.num_anchors // num_scales} ratios; "
        f"Detectron2 anchor a <- mmdet anchor {perm})"
    )


def convert_state_dict(
    sd: Dict[str, Tensor],
    source: Optional[OfficialSource] = None,
    *,
    target: str = "auto",
    depth: Optional[int] = None,
    stem_kernel: Optional[int] = None,
    retinanet_num_scales: int = 3,
) -> Tuple[Dict[str, Tensor], ConversionReport]:
    """Convert an official state dict; returns (our state dict, report).

    ``depth``: the RedNet depth you expect (``ValueError`` if the weights are another depth).
    ``stem_kernel``: the stem involution kernel of the model you will load into (7 for the
    detection/segmentation configs, 3 for the classifier); a mismatching stem kernel generator is
    left out and reported. ``retinanet_num_scales``: anchor sizes per location (mmdet
    ``scales_per_octave``; 3 in the official RetinaNets).
    """
    if source is None:
        source = detect_source(sd)
    if depth is not None and int(depth) != source.depth:
        raise ValueError(
            f"depth: expected RedNet-{depth}, but the checkpoint is RedNet-{source.depth} "
            f"({source.describe()})"
        )
    if stem_kernel is not None and (stem_kernel < 1 or stem_kernel % 2 == 0):
        raise ValueError(f"stem_kernel must be a positive odd int, got {stem_kernel!r}")
    report = ConversionReport(source=source, target=_resolve_target(source, target))
    out = _rename(sd, source, report)
    _fit_stem_kernel(out, source, report, stem_kernel)
    if source.arch == "retinanet" and report.target == "model":
        _permute_retinanet_anchors(out, source, report, retinanet_num_scales)
    return out, report


def _source_dict(source: OfficialSource) -> Dict:
    d = dataclasses.asdict(source)
    d.pop("extras", None)
    return {k: v for k, v in d.items() if v is not None}


def _check_against_config(cfg, source: OfficialSource, out: Dict[str, Tensor], report) -> None:
    """Build ``cfg``'s model on CPU and check every converted tensor has a home of that shape."""
    from detectron2.modeling import build_model

    depth = cfg.MODEL.REDNET.DEPTH
    if depth != source.depth:
        raise ValueError(
            f"config: MODEL.REDNET.DEPTH is {depth} but the checkpoint is RedNet-{source.depth}; "
            f"use a RedNet-{source.depth} config or set MODEL.REDNET.DEPTH {source.depth}"
        )
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    model_sd = build_model(cfg).state_dict()
    prefix = ""
    if report.target == "backbone":
        # Backbone weights are matched by name suffix; find where the RedNet sits in this model.
        stem = [k for k in model_sd if k.endswith("stem.conv1.conv.weight")]
        prefix = stem[0][: -len("stem.conv1.conv.weight")] if stem else ""
    unknown, mismatched = [], []
    for k, v in out.items():
        mk = prefix + (k[len("backbone.") :] if report.target == "backbone" else k)
        if mk not in model_sd:
            unknown.append(k)
        elif tuple(model_sd[mk].shape) != tuple(v.shape):
            mismatched.append(
                f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_sd[mk].shape)}"
            )
    if unknown or [m for m in mismatched if "stem.involution" not in m]:
        raise ValueError(
            f"config: the converted {source.describe()} does not fit this config's model: "
            f"{len(unknown)} names not in the model (e.g. {unknown[:3]}), "
            f"{len(mismatched)} shape mismatches (e.g. {mismatched[:3]})"
        )
    have = {prefix + (k[len("backbone.") :] if report.target == "backbone" else k) for k in out}
    report.missing_in_checkpoint = sorted(
        k
        for k in model_sd
        if k not in have
        and not k.endswith(("num_batches_tracked", "pixel_mean", "pixel_std"))
        and "cell_anchors" not in k
        and (report.target != "backbone" or k.startswith(prefix))
    )


def convert_official_checkpoint(
    src: str,
    dst: Optional[str] = None,
    *,
    target: str = "auto",
    depth: Optional[int] = None,
    stem_kernel: Optional[int] = None,
    cfg=None,
    retinanet_num_scales: int = 3,
) -> ConversionReport:
    """Read an official checkpoint, convert it and (when ``dst`` is given) write a file that
    ``DetectionCheckpointer`` loads into the matching d2_involution model.

    ``target``: "auto" (detectors/segmenters -> their full model, classifiers -> backbone
    weights for any RedNet config), "backbone", "classifier" (``RedNetClassifier``: backbone + fc)
    or "model". ``cfg``: a Detectron2 config to check against (depth, names, shapes); the report
    then lists the model's parameters the checkpoint does not provide. Nothing is written unless
    everything succeeded.
    """
    sd, meta, container = read_official_file(src)
    source = detect_source(sd, container)
    out, report = convert_state_dict(
        sd,
        source,
        target=target,
        depth=depth,
        stem_kernel=stem_kernel,
        retinanet_num_scales=retinanet_num_scales,
    )
    report.class_order = _check_class_order(meta, source, report.target)
    if cfg is not None:
        _check_against_config(cfg, source, out, report)
    report.config_hint = _config_hint(source, report.target)
    if dst is not None:
        if report.target == "backbone":
            export_backbone(out, dst)
        else:
            extra = {"official_source": _source_dict(source)}
            save_detectron2_checkpoint(dst, out, matching_heuristics=False, extra=extra)
        report.dst = dst
    return report


def _check_class_order(meta: Dict, source: OfficialSource, target: str) -> Optional[str]:
    """Compare the checkpoint's ``meta["CLASSES"]`` (mmdet/mmseg save the dataset's class names)
    with the Detectron2 dataset the eval configs use; the classifier heads are not compared."""
    names = meta.get("CLASSES") if isinstance(meta, dict) else None
    if target != "model" or not names or source.arch in ("classifier", "backbone"):
        return None
    from detectron2.data import MetadataCatalog

    if source.framework == "mmseg":
        dataset = "cityscapes_fine_sem_seg_*"
        ours = MetadataCatalog.get("cityscapes_fine_sem_seg_val").stuff_classes
    else:
        dataset, ours = "coco_2017_*", MetadataCatalog.get("coco_2017_val").thing_classes
    names = [str(n) for n in names]
    if names == list(ours):
        return f"the checkpoint's {len(names)} classes are {dataset}'s, in the same order"
    if len(names) != len(ours) or sorted(names) != sorted(ours):
        return (
            f"the checkpoint's {len(names)} classes are not {dataset}'s {len(ours)} (first: "
            f"{names[:3]}); register your dataset with these names in this order"
        )
    i = next(i for i, (a, b) in enumerate(zip(names, ours)) if a != b)
    return (
        f"WARNING: same classes as {dataset} but in another order (index {i}: {names[i]!r} vs "
        f"{ours[i]!r}); predictions' class ids follow the checkpoint's order"
    )


_EVAL_CONFIGS = {
    ("faster_rcnn", "conv", "conv"): "faster_rcnn_rednet50_fpn_1x.yaml",
    ("faster_rcnn", "involution", "conv"): "faster_rcnn_rednet50_involution_fpn_1x.yaml",
    ("faster_rcnn", "involution", "involution"): "faster_rcnn_rednet50_involution_fpn_head_1x.yaml",
    ("mask_rcnn", "conv", "conv"): "mask_rcnn_rednet50_fpn_1x.yaml",
    ("mask_rcnn", "involution", "conv"): "mask_rcnn_rednet50_involution_fpn_1x.yaml",
    ("mask_rcnn", "involution", "involution"): "mask_rcnn_rednet50_involution_fpn_head_1x.yaml",
    ("retinanet", "conv", "conv"): "retinanet_rednet50_fpn_1x.yaml",
    ("retinanet", "involution", "conv"): "retinanet_rednet50_involution_fpn_1x.yaml",
    ("semantic_fpn", "conv", None): "semantic_fpn_rednet50_512x1024_80k.yaml",
    ("semantic_fpn", "involution", None): "semantic_fpn_rednet50_involution_fpn_512x1024_80k.yaml",
    ("upernet", None, None): "upernet_rednet50_512x1024_80k.yaml",
}
_CONFIG_DIRS = {
    "faster_rcnn": "COCO-Detection",
    "retinanet": "COCO-Detection",
    "mask_rcnn": "COCO-InstanceSegmentation",
    "semantic_fpn": "Cityscapes",
    "upernet": "Cityscapes",
}


def _config_hint(source: OfficialSource, target: str) -> Optional[str]:
    """The training config whose model this is, evaluated with the converted MODEL.WEIGHTS."""
    if target != "model":
        return None
    name = _EVAL_CONFIGS.get((source.arch, source.neck, source.head))
    if name is None or source.depth != 50:
        return None
    config = f"configs/{_CONFIG_DIRS[source.arch]}/{name}"
    return f"train_net.py --config-file {config} --eval-only MODEL.WEIGHTS <this file>"
