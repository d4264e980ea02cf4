"""RedNet (Li et al., CVPR'21): a ResNet whose 3x3 convolutions are replaced by involutions.

Structure (the official code, d-li14/involution, ``mmdet/mmcls/mmseg .../backbones/rednet.py``):

* stem: 3x3 conv s2 (3 -> 32) + norm + ReLU; Involution(32, K_stem, s1); norm; ReLU;
  3x3 conv (32 -> 64) + norm + ReLU; 3x3 max-pool s2 (padding 1). Stride 4.
  K_stem is 3 in the ImageNet classifiers and 7 in the official detection/segmentation backbones.
* blocks ("pytorch" style): 1x1 conv + norm + ReLU; Involution(mid, 7, stride, dilation); norm;
  ReLU; 1x1 conv + norm; shortcut = 1x1 conv (stride) + norm whenever the stride or the channels
  change (so the first block of res2 has a stride-1 projection 64 -> 256); add; ReLU.
* stages res2..res5 with (1,2,4,1) / (2,3,5,2) / (3,4,6,3) / (3,4,23,3) / (3,8,36,3) blocks for
  depths 26/38/50/101/152, widths 256/512/1024/2048, strides 4/8/16/32 (res5: 16 when dilated).

Module names (what the checkpoint converter maps the official keys onto; ``layer{i}`` of the
official code is ``res{i+1}`` here, everything inside a block keeps the official name):

======================================  ==================================================
ours                                    official (mmcls/mmdet/mmseg ``backbone.*``)
======================================  ==================================================
``stem.conv1.conv``, ``stem.conv1.bn``  ``stem.0.conv``, ``stem.0.bn``
``stem.involution.*``                   ``stem.1.*`` (``conv1.conv``, ``conv1.bn``, ``conv2.conv``)
``stem.bn``                             ``stem.2``
``stem.conv2.conv``, ``stem.conv2.bn``  ``stem.4.conv``, ``stem.4.bn``
``res{k}.{i}.conv1`` / ``bn1``          ``layer{k-1}.{i}.conv1`` / ``bn1``
``res{k}.{i}.conv2.*`` (Involution)     ``layer{k-1}.{i}.conv2.*``
``res{k}.{i}.bn2``, ``conv3``, ``bn3``  ``layer{k-1}.{i}.bn2``, ``conv3``, ``bn3``
``res{k}.{i}.downsample.0`` / ``.1``    ``layer{k-1}.{i}.downsample.0`` / ``.1``
======================================  ==================================================

The max-pool has no parameters (``stem.maxpool``). The backbone itself is Detectron2's ``ResNet``
built from these blocks (as Detectron2's DeepLab builds its own): ``output_shape()``, ``forward``
and ``freeze(at)`` are ResNet's, and ``freeze`` turns the frozen part's BatchNorms (FrozenStatsBN
and SyncBN included) into ``FrozenBatchNorm2d``. Norms are chosen by Detectron2 name plus
``"FrozenStatsBN"`` (see :mod:`d2_involution.layers.norm`).
"""

from typing import Any, Dict, List, Optional, Sequence

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import CNNBlockBase, ShapeSpec
from detectron2.modeling.backbone import ResNet
from detectron2.modeling.backbone.build import BACKBONE_REGISTRY
from torch import nn

from ..layers import ConvNormAct, Involution, get_norm_layer, init_kernel_generators
from .involution_blocks import involution_args

__all__ = [
    "REDNET_DEPTHS",
    "RedNetStem",
    "RedNetBlock",
    "make_rednet_stages",
    "build_rednet",
    "build_rednet_backbone",
]

#: blocks per stage (res2, res3, res4, res5) for each depth, as in the official RedNets.
REDNET_DEPTHS: Dict[int, Sequence[int]] = {
    26: (1, 2, 4, 1),
    38: (2, 3, 5, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}

_OUT_FEATURES = ("stem", "res2", "res3", "res4", "res5")


def _apply_norm(norm: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


def _msra_fill_convs(module: nn.Module) -> None:
    """The official init of every conv (Kaiming normal, fan_out, ReLU; biases 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            weight_init.c2_msra_fill(m)


class RedNetStem(CNNBlockBase):
    """The RedNet stem (stride 4): conv-s2, involution, conv, then a 3x3 s2 max-pool."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 64,
        *,
        involution_kernel: int = 7,
        group_channels: int = 16,
        reduction_ratio: int = 4,
        norm: str = "BN",
    ):
        super().__init__(in_channels, out_channels, 4)
        mid = out_channels // 2
        self.conv1 = ConvNormAct(in_channels, mid, 3, stride=2, padding=1, bias=False, norm=norm)
        self.involution = Involution(
            mid,
            kernel_size=involution_kernel,
            group_channels=group_channels,
            reduction_ratio=reduction_ratio,
            norm=norm,
        )
        self.bn = get_norm_layer(norm, mid)
        self.conv2 = ConvNormAct(mid, out_channels, 3, stride=1, padding=1, bias=False, norm=norm)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        _msra_fill_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        # ReLU in place, as torchvision's ResNet does: its input is a new tensor that no backward
        # needs (norms, convs and the involution save their inputs, not their outputs).
        x = _apply_norm(self.bn, self.involution(x)).relu_()
        x = self.conv2(x)
        return self.maxpool(x)


class RedNetBlock(CNNBlockBase):
    """RedNet bottleneck: 1x1 conv, Involution (carries stride/dilation), 1x1 conv, residual add.

    ``zero_init_residual`` zero-initialises the last norm's scale (the official init).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        bottleneck_channels: int,
        stride: int = 1,
        dilation: int = 1,
        kernel_size: int = 7,
        group_channels: int = 16,
        reduction_ratio: int = 4,
        norm: str = "BN",
        zero_init_residual: bool = True,
    ):
        super().__init__(in_channels, out_channels, stride)
        self.conv1 = nn.Conv2d(in_channels, bottleneck_channels, 1, bias=False)
        self.bn1 = get_norm_layer(norm, bottleneck_channels)
        self.conv2 = Involution(
            bottleneck_channels,
            kernel_size=kernel_size,
            stride=stride,
            group_channels=group_channels,
            reduction_ratio=reduction_ratio,
            norm=norm,
            dilation=dilation,
        )
        self.bn2 = get_norm_layer(norm, bottleneck_channels)
        self.conv3 = nn.Conv2d(bottleneck_channels, out_channels, 1, bias=False)
        self.bn3 = get_norm_layer(norm, out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            layers = [nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)]
            shortcut_norm = get_norm_layer(norm, out_channels)
            if shortcut_norm is not None:
                layers.append(shortcut_norm)
            self.downsample = nn.Sequential(*layers)
        _msra_fill_convs(self)
        if zero_init_residual and getattr(self.bn3, "weight", None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ReLUs and the residual add in place (see RedNetStem.forward): one full-size tensor less
        # to allocate and fill per op.
        out = _apply_norm(self.bn1, self.conv1(x)).relu_()
        out = _apply_norm(self.bn2, self.conv2(out)).relu_()
        out = _apply_norm(self.bn3, self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return out.add_(identity).relu_()


def make_rednet_stages(
    depth: int,
    *,
    num_stages: int = 4,
    in_channels: int = 64,
    res2_out_channels: int = 256,
    res5_dilation: int = 1,
    **block_kwargs: Any,
) -> List[List[CNNBlockBase]]:
    """Stages res2.. of RedNet-``depth`` with ``ResNet.make_stage``; ``block_kwargs`` go to every
    :class:`RedNetBlock`. Each stage doubles the width; the first block of res3..res5 has stride 2
    (res5: stride 1 and dilation ``res5_dilation`` when that is 2)."""
    stages = []
    out_channels = res2_out_channels
    for idx, num_blocks in enumerate(REDNET_DEPTHS[depth][:num_stages]):
        dilation = res5_dilation if idx == 3 else 1
        first_stride = 1 if idx == 0 or dilation > 1 else 2
        stages.append(
            ResNet.make_stage(
                RedNetBlock,
                num_blocks,
                in_channels=in_channels,
                out_channels=out_channels,
                bottleneck_channels=out_channels // 4,
                stride_per_block=[first_stride] + [1] * (num_blocks - 1),
                dilation=dilation,
                **block_kwargs,
            )
        )
        in_channels = out_channels
        out_channels *= 2
    return stages


def _check_rednet_args(
    depth: int,
    norm: str,
    out_features: Sequence[str],
    freeze_at: int,
    res5_dilation: int,
    channels: Sequence[int],
) -> None:
    if depth not in REDNET_DEPTHS:
        raise ValueError(f"RedNet: depth must be one of {sorted(REDNET_DEPTHS)}, got {depth!r}")
    if isinstance(out_features, str):
        raise TypeError(f"RedNet: out_features must be a list of names, got str {out_features!r}")
    if not out_features or any(f not in _OUT_FEATURES for f in out_features):
        raise ValueError(
            f"RedNet: out_features must be a non-empty subset of {list(_OUT_FEATURES)}, "
            f"got {list(out_features)}"
        )
    if not isinstance(freeze_at, int) or not 0 <= freeze_at <= 5:
        raise ValueError(f"RedNet: freeze_at must be an int in [0, 5], got {freeze_at!r}")
    if res5_dilation not in (1, 2):
        raise ValueError(f"RedNet: res5_dilation must be 1 or 2, got {res5_dilation!r}")
    if any(c % 4 != 0 for c in channels):
        raise ValueError(
            "RedNet: stem_out_channels and res2_out_channels must be multiples of 4, got "
            f"{list(channels)}"
        )
    get_norm_layer(norm, 64)  # fail early with a clear message on an unknown norm
    if norm == "GN":
        raise ValueError(
            "RedNet: norm 'GN' (32 groups) does not fit the involution kernel generators, which "
            "have 8..128 channels; use 'BN', 'SyncBN', 'FrozenBN' or 'FrozenStatsBN'"
        )


def _rednet_args_from_config(cfg: CfgNode, input_shape: Optional[ShapeSpec] = None) -> Dict:
    """``build_rednet`` arguments from ``MODEL.REDNET``, ``MODEL.INVOLUTION`` and
    ``MODEL.BACKBONE.FREEZE_AT`` (input channels: ``input_shape`` or ``MODEL.PIXEL_MEAN``)."""
    r = cfg.MODEL.REDNET
    return {
        "depth": r.DEPTH,
        "stem_involution_kernel": r.STEM_INVOLUTION_KERNEL,
        "norm": r.NORM,
        "out_features": list(r.OUT_FEATURES),
        "freeze_at": cfg.MODEL.BACKBONE.FREEZE_AT,
        "res5_dilation": r.RES5_DILATION,
        "zero_init_residual": r.ZERO_INIT_RESIDUAL,
        "stem_out_channels": r.STEM_OUT_CHANNELS,
        "res2_out_channels": r.RES2_OUT_CHANNELS,
        "in_channels": len(cfg.MODEL.PIXEL_MEAN) if input_shape is None else input_shape.channels,
        **involution_args(cfg),
    }


@configurable(from_config=_rednet_args_from_config)
def build_rednet(
    depth: int,
    *,
    stem_involution_kernel: int = 7,
    norm: str = "BN",
    out_features: Sequence[str] = ("res5",),
    freeze_at: int = 0,
    res5_dilation: int = 1,
    kernel_size: int = 7,
    group_channels: int = 16,
    reduction_ratio: int = 4,
    zero_init_residual: bool = True,
    stem_out_channels: int = 64,
    res2_out_channels: int = 256,
    in_channels: int = 3,
    generator_init: str = "official",
) -> ResNet:
    """RedNet-``depth``: Detectron2's ``ResNet`` of a :class:`RedNetStem` and RedNet stages.

    Called with arguments, or as ``build_rednet(cfg[, input_shape], **overrides)`` (Detectron2's
    ``@configurable``). ``stem_involution_kernel`` is 3 for the ImageNet classifiers and 7 for the
    official detection/segmentation backbones; ``res5_dilation`` 2 keeps res5 at stride 16.
    Stages deeper than the deepest of ``out_features`` are not built. ``generator_init``:
    :func:`~d2_involution.layers.init_kernel_generators` after the official fill.
    """
    _check_rednet_args(
        depth, norm, out_features, freeze_at, res5_dilation, (stem_out_channels, res2_out_channels)
    )
    shared = dict(group_channels=group_channels, reduction_ratio=reduction_ratio, norm=norm)
    stem = RedNetStem(
        in_channels, stem_out_channels, involution_kernel=stem_involution_kernel, **shared
    )
    stages = make_rednet_stages(
        depth,
        num_stages=max(_OUT_FEATURES.index(f) for f in out_features),
        in_channels=stem_out_channels,
        res2_out_channels=res2_out_channels,
        res5_dilation=res5_dilation,
        kernel_size=kernel_size,
        zero_init_residual=zero_init_residual,
        **shared,
    )
    rednet = ResNet(stem, stages, out_features=list(out_features))
    init_kernel_generators(rednet, generator_init)
    return rednet.freeze(freeze_at)


@BACKBONE_REGISTRY.register()
def build_rednet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> ResNet:
    """RedNet from ``MODEL.REDNET``, ``MODEL.INVOLUTION`` and ``MODEL.BACKBONE.FREEZE_AT``."""
    return build_rednet(cfg, input_shape)
