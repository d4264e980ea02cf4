"""An independent functional model of the official RedNet networks, read off their weights.

Everything here takes a state dict in an *official* layout (mmcls / mmdet / mmseg module names as
the official code d-li14/involution produces them, or PaddleClas's names) and computes outputs
with ``torch.nn.functional`` only: no d2_involution module, no Detectron2 module. Tests compare
the converted Detectron2 models against these functions; nothing here knows the Detectron2 names.

Also here: writers of random checkpoints in those layouts (keys and shapes exactly as the official
code produces them; the classifier and the detection backbone + involution FPN come from
shared/reference/official_rednet_keys.json).
"""

import json
import math
import os
import pickle
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn import functional as F

Tensor = torch.Tensor
StateDict = Dict[str, Tensor]

_HERE = os.path.dirname(os.path.abspath(__file__))
# The project's shared/ folder sits beside the checkout (CI: ``../shared``) or inside it.
KEYS_JSON_CANDIDATES = [
    os.environ.get("D2INV_OFFICIAL_KEYS", ""),
    os.path.join(_HERE, "..", "..", "shared", "reference", "official_rednet_keys.json"),
    os.path.join(_HERE, "..", "shared", "reference", "official_rednet_keys.json"),
]
KEYS_JSON = next((p for p in KEYS_JSON_CANDIDATES if p and os.path.exists(p)), None)
if KEYS_JSON is None and os.environ.get("CI"):
    raise FileNotFoundError(
        "CI must run the official-layout tests: official_rednet_keys.json not found in "
        + ", ".join(p for p in KEYS_JSON_CANDIDATES if p)
    )
STAGE_BLOCKS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGE_BLOCKS[152] = (3, 8, 36, 3)
BN_EPS = 1e-5


def official_keys(name: str) -> Dict[str, List[int]]:
    """Keys -> shapes of one entry of official_rednet_keys.json (e.g. ``mmcls_rednet26``)."""
    if KEYS_JSON is None:
        raise FileNotFoundError(
            "official_rednet_keys.json not found; looked in " + ", ".join(KEYS_JSON_CANDIDATES[1:])
        )
    with open(KEYS_JSON) as f:
        return json.load(f)[name]["keys"]


# ------------------------------------------------------------------------------------------------
# Primitive ops, each on a "getter" g(name) -> tensor that hides the layout's parameter names.
# ------------------------------------------------------------------------------------------------
class Weights:
    """Access to a state dict under a prefix; BN statistics named per layout (mm or paddle)."""

    def __init__(self, sd: StateDict, layout: str = "openmmlab"):
        self.sd = sd
        self.layout = layout

    def __call__(self, name: str) -> Tensor:
        return self.sd[name]

    def has(self, name: str) -> bool:
        return name in self.sd

    def bn(self, x: Tensor, p: str) -> Tensor:
        if self.layout == "paddle":
            mean, var = self.sd[p + "._mean"], self.sd[p + "._variance"]
        else:
            mean, var = self.sd[p + ".running_mean"], self.sd[p + ".running_var"]
        shape = (1, -1, 1, 1)
        scale = self.sd[p + ".weight"] / torch.sqrt(var + BN_EPS)
        return (x - mean.view(shape)) * scale.view(shape) + self.sd[p + ".bias"].view(shape)

    def conv(self, x: Tensor, p: str, stride: int = 1, padding: Optional[int] = None) -> Tensor:
        w = self.sd[p + ".weight"]
        if padding is None:
            padding = (w.shape[-1] - 1) // 2
        return F.conv2d(x, w, self.sd.get(p + ".bias"), stride=stride, padding=padding)


def involution_ref(w: Weights, x: Tensor, p: str, kernel: int, stride: int = 1) -> Tensor:
    """The official involution: kernels from (avgpool) -> 1x1 conv+BN+ReLU -> 1x1 conv, then an
    unfold-and-weighted-sum over K*K neighbours, groups of 16 contiguous channels."""
    src = F.avg_pool2d(x, stride, stride) if stride > 1 else x
    kern = w.conv(F.relu(w.bn(w.conv(src, p + ".conv1.conv"), p + ".conv1.bn")), p + ".conv2.conv")
    n, c, h, wd = x.shape
    groups = c // 16
    ho, wo = kern.shape[-2:]
    kern = kern.reshape(n, groups, 1, kernel * kernel, ho, wo)
    cols = F.unfold(x, kernel, padding=(kernel - 1) // 2, stride=stride)
    cols = cols.reshape(n, groups, c // groups, kernel * kernel, ho, wo)
    return (kern * cols).sum(3).reshape(n, c, ho, wo)


def conv_module(w: Weights, x: Tensor, p: str, stride: int = 1, act: bool = True) -> Tensor:
    """mmcv ConvModule: ``p.conv`` then optional ``p.bn`` then ReLU."""
    y = w.conv(x, p + ".conv", stride=stride)
    if w.has(p + ".bn.weight"):
        y = w.bn(y, p + ".bn")
    return F.relu(y) if act else y


# ------------------------------------------------------------------------------------------------
# RedNet (mmcls / mmdet / mmseg share the same module names; PaddleClas differs only in the stem
# Sequential's inner names and the BN statistics, handled by ``Weights``).
# ------------------------------------------------------------------------------------------------
def infer_depth(sd: StateDict, prefix: str) -> int:
    counts = []
    for stage in range(1, 5):
        n = 0
        while f"{prefix}layer{stage}.{n}.conv1.weight" in sd:
            n += 1
        counts.append(n)
    for depth, blocks in STAGE_BLOCKS.items():
        if tuple(counts) == blocks:
            return depth
    raise ValueError(f"reference: unknown RedNet block counts {counts}")


def rednet_ref(w: Weights, x: Tensor, prefix: str = "backbone.") -> List[Tensor]:
    """C2..C5 of an official RedNet (stem kernel read from the weights)."""
    depth = infer_depth(w.sd, prefix)
    stem_k = int(round(math.sqrt(w(prefix + "stem.1.conv2.conv.weight").shape[0] // 2)))
    y = conv_module(w, x, prefix + "stem.0", stride=2)
    y = involution_ref(w, y, prefix + "stem.1", stem_k)
    y = F.relu(w.bn(y, prefix + "stem.2"))
    y = conv_module(w, y, prefix + "stem.4")
    y = F.max_pool2d(y, 3, 2, 1)
    outs = []
    for stage, n_blocks in enumerate(STAGE_BLOCKS[depth], start=1):
        for b in range(n_blocks):
            p = f"{prefix}layer{stage}.{b}."
            stride = 2 if (b == 0 and stage > 1) else 1
            t = F.relu(w.bn(w.conv(y, p + "conv1"), p + "bn1"))
            t = F.relu(w.bn(involution_ref(w, t, p + "conv2", 7, stride), p + "bn2"))
            t = w.bn(w.conv(t, p + "conv3"), p + "bn3")
            if w.has(p + "downsample.0.weight"):
                idt = w.bn(w.conv(y, p + "downsample.0", stride=stride), p + "downsample.1")
            else:
                idt = y
            y = F.relu(t + idt)
        outs.append(y)
    return outs


def classifier_ref(w: Weights, x: Tensor) -> Tensor:
    """Logits of an mmcls ImageClassifier (GAP + LinearClsHead) or a PaddleClas RedNet."""
    if w.layout == "paddle":
        feat = rednet_ref(w, x, prefix="")[-1].mean((2, 3))
        return feat @ w("fc.weight") + w("fc.bias")  # Paddle Linear stores (in, out)
    feat = rednet_ref(w, x)[-1].mean((2, 3))
    return F.linear(feat, w("head.fc.weight"), w("head.fc.bias"))


# ------------------------------------------------------------------------------------------------
# Necks (mmdet / mmseg FPN and FPN_involution)
# ------------------------------------------------------------------------------------------------
def fpn_ref(
    w: Weights,
    feats: Sequence[Tensor],
    num_outs: int,
    start_level: int = 0,
    extra: str = "maxpool",
    prefix: str = "neck.",
) -> List[Tensor]:
    """mmdet FPN / FPN_involution forward. ``feats`` = all backbone levels (C2..C5); ``extra``:
    "maxpool" (R-CNN) or "on_input" (RetinaNet, no ReLU between the extra convs)."""
    inputs = list(feats)[start_level:]
    lat = [w.conv(x, f"{prefix}lateral_convs.{i}.conv") for i, x in enumerate(inputs)]
    for i in range(len(lat) - 1, 0, -1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
    outs = []
    for i, x in enumerate(lat):
        p = f"{prefix}fpn_convs.{i}"
        if w.has(p + ".conv1.conv.weight"):
            outs.append(involution_ref(w, x, p, 7))
        else:
            outs.append(w.conv(x, p + ".conv"))
    n = len(outs)
    if num_outs > n:
        if extra == "maxpool":
            for _ in range(num_outs - n):
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        else:
            outs.append(w.conv(inputs[-1], f"{prefix}fpn_convs.{n}.conv", stride=2))
            for i in range(n + 1, num_outs):
                outs.append(w.conv(outs[-1], f"{prefix}fpn_convs.{i}.conv", stride=2))
    return outs


# ------------------------------------------------------------------------------------------------
# Heads (mmdet 2.x module names)
# ------------------------------------------------------------------------------------------------
def rpn_head_ref(w: Weights, feats: Sequence[Tensor], prefix: str = "rpn_head.") -> List[Tuple]:
    """(objectness (N, A, H, W), deltas (N, A*4, H, W)) per level, mmdet anchor order."""
    outs = []
    for x in feats:
        if w.has(prefix + "rpn_conv.conv1.conv.weight"):
            t = F.relu(involution_ref(w, x, prefix + "rpn_conv", 7))
        else:
            t = F.relu(w.conv(x, prefix + "rpn_conv"))
        outs.append((w.conv(t, prefix + "rpn_cls"), w.conv(t, prefix + "rpn_reg")))
    return outs


def bbox_head_ref(w: Weights, rois: Tensor, prefix: str = "roi_head.bbox_head.") -> Tuple:
    """Shared2FCBBoxHead on pooled RoI features (R, 256, 7, 7): (cls_score, bbox_pred)."""
    x = rois.flatten(1)
    for i in range(2):
        x = F.relu(
            F.linear(x, w(f"{prefix}shared_fcs.{i}.weight"), w(f"{prefix}shared_fcs.{i}.bias"))
        )
    cls = F.linear(x, w(prefix + "fc_cls.weight"), w(prefix + "fc_cls.bias"))
    reg = F.linear(x, w(prefix + "fc_reg.weight"), w(prefix + "fc_reg.bias"))
    return cls, reg


def mask_head_ref(w: Weights, rois: Tensor, prefix: str = "roi_head.mask_head.") -> Tensor:
    """FCNMaskHead / FCNMaskHead_involution on pooled RoI features (R, 256, 14, 14)."""
    x = rois
    i = 0
    while w.has(f"{prefix}convs.{i}.conv.weight") or w.has(
        f"{prefix}convs.{i}.0.conv1.conv.weight"
    ):
        if w.has(f"{prefix}convs.{i}.conv.weight"):
            x = F.relu(w.conv(x, f"{prefix}convs.{i}.conv"))
        else:
            x = F.relu(involution_ref(w, x, f"{prefix}convs.{i}.0", 7))
        i += 1
    x = F.relu(F.conv_transpose2d(x, w(prefix + "upsample.weight"), w(prefix + "upsample.bias"), 2))
    return w.conv(x, prefix + "conv_logits")


def retina_head_ref(w: Weights, feats: Sequence[Tensor], prefix: str = "bbox_head.") -> List:
    """(cls (N, A*K, H, W), reg (N, A*4, H, W)) per level, mmdet (ratio-major) anchor order."""
    outs = []
    for x in feats:
        c, r = x, x
        i = 0
        while w.has(f"{prefix}cls_convs.{i}.conv.weight"):
            c = F.relu(w.conv(c, f"{prefix}cls_convs.{i}.conv"))
            r = F.relu(w.conv(r, f"{prefix}reg_convs.{i}.conv"))
            i += 1
        outs.append((w.conv(c, prefix + "retina_cls"), w.conv(r, prefix + "retina_reg")))
    return outs


# ------------------------------------------------------------------------------------------------
# mmdet 2.x anchors and box decoding (AnchorGenerator, DeltaXYWHBBoxCoder), for semantic checks
# ------------------------------------------------------------------------------------------------
def mmdet_anchors(stride: int, scales: Sequence[float], ratios: Sequence[float], h: int, w: int):
    """All anchors of one level, (h*w*A, 4) XYXY, in mmdet's order: locations row-major, then the
    A = len(ratios)*len(scales) anchors of a location ratio-major (index r * S + s); ratio = h/w,
    anchor side = stride * scale, centred on (x*stride, y*stride) (center_offset 0)."""
    base = []
    for ratio in ratios:
        for scale in scales:
            bw = stride * scale / math.sqrt(ratio)
            bh = stride * scale * math.sqrt(ratio)
            base.append([-0.5 * bw, -0.5 * bh, 0.5 * bw, 0.5 * bh])
    base = torch.tensor(base, dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(h) * stride, torch.arange(w) * stride, indexing="ij")
    shifts = torch.stack([xs, ys, xs, ys], -1).reshape(-1, 1, 4).double()
    return (shifts + base[None]).reshape(-1, 4)


def mmdet_delta2bbox(rois: Tensor, deltas: Tensor, stds: Sequence[float]) -> Tensor:
    """mmdet 2.x ``delta2bbox`` (means 0, no clipping to the image): rois (R, 4), deltas (R, 4)."""
    d = deltas * torch.tensor(stds, dtype=deltas.dtype)
    max_ratio = abs(math.log(16 / 1000))
    dw, dh = d[:, 2].clamp(-max_ratio, max_ratio), d[:, 3].clamp(-max_ratio, max_ratio)
    px, py = (rois[:, 0] + rois[:, 2]) * 0.5, (rois[:, 1] + rois[:, 3]) * 0.5
    pw, ph = rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1]
    gw, gh = pw * dw.exp(), ph * dh.exp()
    gx, gy = px + pw * d[:, 0], py + ph * d[:, 1]
    return torch.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], -1)


# ------------------------------------------------------------------------------------------------
# mmseg decode heads
# ------------------------------------------------------------------------------------------------
def _bilinear(x: Tensor, size) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def fpn_seg_head_ref(w: Weights, feats: Sequence[Tensor], prefix: str = "decode_head.") -> Tensor:
    """mmseg FPNHead logits at the stride of the first level (before the final resize)."""
    out = None
    for i, x in enumerate(feats):
        j = 0
        while w.has(f"{prefix}scale_heads.{i}.{j}.conv.weight"):
            x = conv_module(w, x, f"{prefix}scale_heads.{i}.{j}")
            if i > 0:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            j += 2
        out = x if out is None else out + _bilinear(x, out.shape[-2:])
    return w.conv(out, prefix + "conv_seg")


def uper_head_ref(w: Weights, feats: Sequence[Tensor], prefix: str = "decode_head.") -> Tensor:
    """mmseg UPerHead logits at the stride of the first level (before the final resize)."""
    c5 = feats[-1]
    pooled = [c5]
    i = 0
    while w.has(f"{prefix}psp_modules.{i}.1.conv.weight"):
        scale = (1, 2, 3, 6)[i]
        y = conv_module(w, F.adaptive_avg_pool2d(c5, scale), f"{prefix}psp_modules.{i}.1")
        pooled.append(_bilinear(y, c5.shape[-2:]))
        i += 1
    lat = [conv_module(w, x, f"{prefix}lateral_convs.{i}") for i, x in enumerate(feats[:-1])]
    lat.append(conv_module(w, torch.cat(pooled, 1), prefix + "bottleneck"))
    for i in range(len(lat) - 1, 0, -1):
        lat[i - 1] = lat[i - 1] + _bilinear(lat[i], lat[i - 1].shape[-2:])
    outs = [conv_module(w, lat[i], f"{prefix}fpn_convs.{i}") for i in range(len(lat) - 1)]
    outs.append(lat[-1])
    outs = [outs[0]] + [_bilinear(o, outs[0].shape[-2:]) for o in outs[1:]]
    y = conv_module(w, torch.cat(outs, 1), prefix + "fpn_bottleneck")
    return w.conv(y, prefix + "conv_seg")


# ------------------------------------------------------------------------------------------------
# Official-layout key/shape tables and random checkpoint writers
# ------------------------------------------------------------------------------------------------
def _bn(p: str, c: int, paddle: bool = False) -> Dict[str, List[int]]:
    if paddle:
        return {f"{p}.weight": [c], f"{p}.bias": [c], f"{p}._mean": [c], f"{p}._variance": [c]}
    return {
        f"{p}.weight": [c],
        f"{p}.bias": [c],
        f"{p}.running_mean": [c],
        f"{p}.running_var": [c],
        f"{p}.num_batches_tracked": [],
    }


def _involution_keys(p: str, c: int, k: int = 7) -> Dict[str, List[int]]:
    keys = {f"{p}.conv1.conv.weight": [c // 4, c, 1, 1]}
    keys.update(_bn(p + ".conv1.bn", c // 4))
    keys.update({f"{p}.conv2.conv.weight": [k * k * c // 16, c // 4, 1, 1]})
    keys[f"{p}.conv2.conv.bias"] = [k * k * c // 16]
    return keys


def _conv_keys(p: str, cin: int, cout: int, k: int, norm: bool = False) -> Dict[str, List[int]]:
    if norm:
        keys = {f"{p}.conv.weight": [cout, cin, k, k]}
        keys.update(_bn(p + ".bn", cout))
        return keys
    return {f"{p}.conv.weight": [cout, cin, k, k], f"{p}.conv.bias": [cout]}


def backbone_keys(depth: int, stem_kernel: int = 7) -> Dict[str, List[int]]:
    """mmdet/mmseg RedNet backbone keys (``backbone.*``): the mmcls classifier's without the head,
    with the stem involution's kernel generator sized for ``stem_kernel``."""
    keys = {
        k: v for k, v in official_keys(f"mmcls_rednet{depth}").items() if k.startswith("backbone")
    }
    n = stem_kernel * stem_kernel * 2
    keys["backbone.stem.1.conv2.conv.weight"] = [n, 8, 1, 1]
    keys["backbone.stem.1.conv2.conv.bias"] = [n]
    return keys


def neck_keys(involution: bool, start_level: int = 0, retina: bool = False) -> Dict:
    """mmdet/mmseg FPN (``FPN`` or ``FPN_involution``) keys for RedNet's 256..2048 channels."""
    chans = [256, 512, 1024, 2048][start_level:]
    keys = {}
    for i, c in enumerate(chans):
        keys.update(_conv_keys(f"neck.lateral_convs.{i}", c, 256, 1))
    for i in range(len(chans)):
        if involution:
            keys.update(_involution_keys(f"neck.fpn_convs.{i}", 256))
        else:
            keys.update(_conv_keys(f"neck.fpn_convs.{i}", 256, 256, 3))
    if retina:
        keys.update(_conv_keys(f"neck.fpn_convs.{len(chans)}", 2048, 256, 3))
        keys.update(_conv_keys(f"neck.fpn_convs.{len(chans) + 1}", 256, 256, 3))
    return keys


def rpn_keys(involution: bool, num_anchors: int = 3) -> Dict[str, List[int]]:
    keys = (
        _involution_keys("rpn_head.rpn_conv", 256)
        if involution
        else {"rpn_head.rpn_conv.weight": [256, 256, 3, 3], "rpn_head.rpn_conv.bias": [256]}
    )
    keys.update({"rpn_head.rpn_cls.weight": [num_anchors, 256, 1, 1]})
    keys["rpn_head.rpn_cls.bias"] = [num_anchors]
    keys["rpn_head.rpn_reg.weight"] = [num_anchors * 4, 256, 1, 1]
    keys["rpn_head.rpn_reg.bias"] = [num_anchors * 4]
    return keys


def bbox_head_keys(num_classes: int) -> Dict[str, List[int]]:
    p = "roi_head.bbox_head."
    return {
        p + "fc_cls.weight": [num_classes + 1, 1024],
        p + "fc_cls.bias": [num_classes + 1],
        p + "fc_reg.weight": [num_classes * 4, 1024],
        p + "fc_reg.bias": [num_classes * 4],
        p + "shared_fcs.0.weight": [1024, 256 * 7 * 7],
        p + "shared_fcs.0.bias": [1024],
        p + "shared_fcs.1.weight": [1024, 1024],
        p + "shared_fcs.1.bias": [1024],
    }


def mask_head_keys(num_classes: int, involution: bool) -> Dict[str, List[int]]:
    p = "roi_head.mask_head."
    keys = {}
    for i in range(4):
        if involution:
            keys.update(_involution_keys(f"{p}convs.{i}.0", 256))
        else:
            keys.update(_conv_keys(f"{p}convs.{i}", 256, 256, 3))
    keys.update({p + "upsample.weight": [256, 256, 2, 2], p + "upsample.bias": [256]})
    keys.update({p + "conv_logits.weight": [num_classes, 256, 1, 1]})
    keys[p + "conv_logits.bias"] = [num_classes]
    return keys


def retina_head_keys(num_classes: int, num_anchors: int = 9) -> Dict[str, List[int]]:
    keys = {}
    for i in range(4):
        keys.update(_conv_keys(f"bbox_head.cls_convs.{i}", 256, 256, 3))
        keys.update(_conv_keys(f"bbox_head.reg_convs.{i}", 256, 256, 3))
    keys["bbox_head.retina_cls.weight"] = [num_anchors * num_classes, 256, 3, 3]
    keys["bbox_head.retina_cls.bias"] = [num_anchors * num_classes]
    keys["bbox_head.retina_reg.weight"] = [num_anchors * 4, 256, 3, 3]
    keys["bbox_head.retina_reg.bias"] = [num_anchors * 4]
    return keys


def fpn_seg_head_keys(num_classes: int = 19, channels: int = 128) -> Dict[str, List[int]]:
    keys = {}
    for i in range(4):
        for j in range(max(1, i)):
            cin = 256 if j == 0 else channels
            keys.update(_conv_keys(f"decode_head.scale_heads.{i}.{2 * j}", cin, channels, 3, True))
    keys.update(_conv_keys("decode_head.conv_seg", channels, num_classes, 1))
    return {k.replace("conv_seg.conv.", "conv_seg."): v for k, v in keys.items()}


def uper_head_keys(num_classes: int = 19, ch: int = 512, aux: bool = True) -> Dict:
    p = "decode_head."
    keys = {}
    for i in range(4):
        keys.update(_conv_keys(f"{p}psp_modules.{i}.1", 2048, ch, 1, True))
    keys.update(_conv_keys(p + "bottleneck", 2048 + 4 * ch, ch, 3, True))
    for i, c in enumerate([256, 512, 1024]):
        keys.update(_conv_keys(f"{p}lateral_convs.{i}", c, ch, 1, True))
        keys.update(_conv_keys(f"{p}fpn_convs.{i}", ch, ch, 3, True))
    keys.update(_conv_keys(p + "fpn_bottleneck", 4 * ch, ch, 3, True))
    keys.update(
        {p + "conv_seg.weight": [num_classes, ch, 1, 1], p + "conv_seg.bias": [num_classes]}
    )
    if aux:
        keys.update(_conv_keys("auxiliary_head.convs.0", 1024, 256, 3, True))
        keys["auxiliary_head.conv_seg.weight"] = [num_classes, 256, 1, 1]
        keys["auxiliary_head.conv_seg.bias"] = [num_classes]
    return keys


def official_layout(kind: str, depth: int = 50, num_classes: Optional[int] = None) -> Dict:
    """Keys -> shapes of an official checkpoint. ``kind``: "mmcls", "faster_rcnn[_neck[_head]]",
    "mask_rcnn[_neck[_head]]", "retinanet[_neck]", "fpn_seg[_neck]", "upernet"."""
    if kind == "mmcls":
        keys = dict(official_keys(f"mmcls_rednet{depth}"))
        if num_classes not in (None, 1000):
            keys["head.fc.weight"] = [num_classes, 2048]
            keys["head.fc.bias"] = [num_classes]
        return keys
    num_classes = num_classes or (19 if kind.startswith(("fpn_seg", "upernet")) else 80)
    neck_inv = "_neck" in kind
    head_inv = kind.endswith("_head")
    if depth == 50 and neck_inv and not kind.startswith(("retinanet", "upernet")):
        keys = dict(official_keys("mmdet_rednet50_involution_fpn"))
    else:
        keys = backbone_keys(depth)
    if kind.startswith(("faster_rcnn", "mask_rcnn")):
        if not (depth == 50 and neck_inv):
            keys.update(neck_keys(neck_inv))
        keys.update(rpn_keys(head_inv))
        keys.update(bbox_head_keys(num_classes))
        if kind.startswith("mask_rcnn"):
            keys.update(mask_head_keys(num_classes, head_inv))
    elif kind.startswith("retinanet"):
        keys.update(neck_keys(neck_inv, start_level=1, retina=True))
        keys.update(retina_head_keys(num_classes))
    elif kind.startswith("fpn_seg"):
        if not (depth == 50 and neck_inv):
            keys.update(neck_keys(neck_inv))
        keys.update(fpn_seg_head_keys(num_classes))
    elif kind == "upernet":
        keys.update(uper_head_keys(num_classes))
    else:
        raise ValueError(f"official_layout: unknown kind {kind!r}")
    return keys


def paddle_layout(depth: int, num_classes: int = 1000) -> Dict[str, List[int]]:
    """PaddleClas RedNet keys: the mmcls backbone names without ``backbone.``, Paddle BN names
    (``_mean``/``_variance``, no ``num_batches_tracked``), ``fc`` stored (in, out)."""
    keys = {}
    for k, shape in official_keys(f"mmcls_rednet{depth}").items():
        if k.endswith("num_batches_tracked"):
            continue
        k = k.replace("running_mean", "_mean").replace("running_var", "_variance")
        if k.startswith("head.fc."):
            keys["fc." + k.split(".")[-1]] = shape[::-1] if k.endswith("weight") else shape
        else:
            keys[k[len("backbone.") :]] = shape
    if num_classes != 1000:
        keys["fc.weight"] = [2048, num_classes]
        keys["fc.bias"] = [num_classes]
    return keys


def random_state_dict(layout: Dict[str, List[int]], seed: int = 0) -> StateDict:
    """Random tensors with the given shapes, scaled so a deep RedNet keeps O(1) activations."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(100, dtype=torch.long)
        elif k.endswith(("running_var", "_variance")):
            sd[k] = torch.rand(shape, generator=gen) * 0.5 + 0.75
        elif k.endswith(("running_mean", "_mean")):
            sd[k] = torch.randn(shape, generator=gen) * 0.1
        elif _is_bn_affine(k, layout):
            # Residual branches start small (as zero-init would) so deep stacks stay O(1).
            base = (0.2 if ".bn3." in k else 1.0) if k.endswith("weight") else 0.0
            sd[k] = base + torch.randn(shape, generator=gen) * 0.1
        elif len(shape) == 1:
            sd[k] = torch.randn(shape, generator=gen) * 0.1
        else:
            fan_in = int(np.prod(shape[1:]))
            if "upsample" in k:
                fan_in = shape[0] * shape[2] * shape[3]
            if k == "fc.weight":
                fan_in = shape[0]
            if k.endswith("conv2.conv.weight"):  # involution kernels sum K*K taps
                fan_in *= shape[0] // 2 if "stem.1." in k else 49
            sd[k] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    return sd


def _is_bn_affine(k: str, layout: Dict) -> bool:
    stem = k.rsplit(".", 1)[0]
    return (stem + ".running_var") in layout or (stem + "._variance") in layout


def write_openmmlab(path: str, sd: StateDict, meta: Optional[dict] = None) -> str:
    """Save like mmcv's ``save_checkpoint``: ``{"meta": ..., "state_dict": ...}``."""
    meta = {"mmcv_version": "1.2.7", "time": "Mon Mar 15 00:00:00 2021"} if meta is None else meta
    torch.save({"meta": meta, "state_dict": sd}, path)
    return path


def write_pdparams(path: str, sd: StateDict) -> str:
    """Save like ``paddle.save`` of a dygraph state dict: a pickled dict of numpy arrays."""
    with open(path, "wb") as f:
        pickle.dump({k: v.numpy() for k, v in sd.items()}, f, protocol=2)
    return path
