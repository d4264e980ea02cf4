"""Feature pyramids on RedNet: Detectron2's FPN with a pluggable output block.

One FPN class serves both necks of the paper: the conv FPN (3x3 output convs, Detectron2's FPN)
and the involution FPN (each 3x3 output conv replaced by ``Involution(256, 7, 1)``: the official
``FPN_involution`` neck of d-li14/involution). Laterals are 1x1 convs (with bias when the FPN has
no norm) in both. The top-down path upsamples (nearest) to the lateral's exact size, which equals
Detectron2's 2x upsampling on padded inputs and also works on sizes that are not multiples of 32.

Module names follow Detectron2's FPN: ``fpn_lateral{s}`` and ``fpn_output{s}`` for stage ``s``
(2..5), ``top_block.p6``/``top_block.p7`` for RetinaNet, ``bottom_up`` for the RedNet. The official
mmdet neck maps as ``neck.lateral_convs.{i}.conv`` -> ``fpn_lateral{i+s0}``, ``neck.fpn_convs.{i}``
-> ``fpn_output{i+s0}`` (an Involution: ``conv1.conv``, ``conv1.bn``, ``conv2.conv``) with s0 = 2
for R-CNN necks and 3 for RetinaNet, whose ``neck.fpn_convs.3``/``.4`` are ``top_block.p6``/``p7``.
"""

import math
from typing import Callable, Dict, List, Optional, Sequence

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import CfgNode
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.build import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn
from torch.nn import functional as F

from ..layers import Involution, get_norm
from .rednet import build_rednet_backbone

__all__ = [
    "FPN",
    "LastLevelP6P7",
    "conv_output_block",
    "involution_output_block",
    "build_rednet_fpn_backbone",
    "build_rednet_involution_fpn_backbone",
    "build_retinanet_rednet_fpn_backbone",
    "build_retinanet_rednet_involution_fpn_backbone",
]

OutputBlockFactory = Callable[[int], nn.Module]


def conv_output_block(norm: str = "") -> OutputBlockFactory:
    """Factory of Detectron2's FPN output block: 3x3 conv (bias iff no norm) + optional norm."""

    def make(channels: int) -> nn.Module:
        conv = Conv2d(
            channels,
            channels,
            kernel_size=3,
            padding=1,
            bias=not norm,
            norm=get_norm(norm, channels),
        )
        weight_init.c2_xavier_fill(conv)
        return conv

    return make


def involution_output_block(
    kernel_size: int = 7, group_channels: int = 16, reduction_ratio: int = 4, norm: str = "BN"
) -> OutputBlockFactory:
    """Factory of the official involution FPN output block: ``Involution(C, K, 1)``.

    ``norm`` is the norm inside the kernel generator (BN in the official neck).
    """

    def make(channels: int) -> nn.Module:
        block = Involution(
            channels,
            kernel_size=kernel_size,
            stride=1,
            group_channels=group_channels,
            reduction_ratio=reduction_ratio,
            norm=norm,
        )
        for module in block.modules():
            if isinstance(module, nn.Conv2d):
                weight_init.c2_xavier_fill(module)
        return block

    return make


class LastLevelP6P7(nn.Module):
    """RetinaNet's P6/P7: 3x3 s2 convs on ``in_feature`` (C5 by default), then on P6.

    ``relu_before_p7``: Detectron2 applies a ReLU between P6 and P7; the official RedNet RetinaNet
    neck (mmdet, ``relu_before_extra_convs=False``) does not.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        in_feature: str = "res5",
        relu_before_p7: bool = False,
    ):
        super().__init__()
        self.num_levels = 2
        self.in_feature = in_feature
        self.relu_before_p7 = relu_before_p7
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for module in (self.p6, self.p7):
            weight_init.c2_xavier_fill(module)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        p6 = self.p6(x)
        p7 = self.p7(F.relu(p6) if self.relu_before_p7 else p6)
        return [p6, p7]


class FPN(Backbone):
    """:paper:`FPN` whose output block (one per level) is built by ``output_block(out_channels)``.

    Arguments and outputs as Detectron2's ``FPN``: features ``p{s}`` of stride ``2**s`` for the
    ``in_features`` (contiguous, high to low resolution) plus the ``top_block`` levels.
    """

    def __init__(
        self,
        bottom_up: Backbone,
        in_features: Sequence[str],
        out_channels: int,
        *,
        output_block: Optional[OutputBlockFactory] = None,
        norm: str = "",
        top_block: Optional[nn.Module] = None,
        fuse_type: str = "sum",
    ):
        super().__init__()
        if not isinstance(bottom_up, Backbone):
            raise TypeError(f"FPN: bottom_up must be a Backbone, got {type(bottom_up).__name__}")
        input_shapes = bottom_up.output_shape()
        missing = [f for f in in_features if f not in input_shapes]
        if not in_features or missing:
            raise ValueError(
                f"FPN: in_features must be a non-empty subset of the bottom-up outputs "
                f"{list(input_shapes)}, got {list(in_features)}"
            )
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"FPN: fuse_type must be 'sum' or 'avg', got {fuse_type!r}")
        strides = [input_shapes[f].stride for f in in_features]
        for prev, cur in zip(strides[:-1], strides[1:]):
            if cur != 2 * prev:
                raise ValueError(
                    f"FPN: strides of in_features {list(in_features)} must double level by "
                    f"level, got {strides} (a dilated res5 cannot feed an FPN)"
                )
        if output_block is None:
            output_block = conv_output_block(norm)

        self.lateral_convs: List[nn.Module] = []
        self.output_convs: List[nn.Module] = []
        for feature, stride in zip(in_features, strides):
            lateral = Conv2d(
                input_shapes[feature].channels,
                out_channels,
                kernel_size=1,
                bias=not norm,
                norm=get_norm(norm, out_channels),
            )
            weight_init.c2_xavier_fill(lateral)
            output = output_block(out_channels)
            stage = int(math.log2(stride))
            self.add_module(f"fpn_lateral{stage}", lateral)
            self.add_module(f"fpn_output{stage}", output)
            self.lateral_convs.append(lateral)
            self.output_convs.append(output)
        # Top-down order (low to high resolution), as in Detectron2.
        self.lateral_convs = self.lateral_convs[::-1]
        self.output_convs = self.output_convs[::-1]
        self.top_block = top_block
        self.in_features = tuple(in_features)
        self.bottom_up = bottom_up
        self._out_feature_strides = {f"p{int(math.log2(s))}": s for s in strides}
        if top_block is not None:
            last = int(math.log2(strides[-1]))
            for s in range(last + 1, last + 1 + top_block.num_levels):
                self._out_feature_strides[f"p{s}"] = 2**s
        self._out_features = list(self._out_feature_strides)
        self._out_feature_channels = {k: out_channels for k in self._out_features}
        self._size_divisibility = strides[-1]
        self._fuse_type = fuse_type

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        bottom_up_features = self.bottom_up(x)
        prev = self.lateral_convs[0](bottom_up_features[self.in_features[-1]])
        results = [self.output_convs[0](prev)]
        for idx in range(1, len(self.lateral_convs)):
            lateral = self.lateral_convs[idx](bottom_up_features[self.in_features[-idx - 1]])
            prev = lateral + F.interpolate(prev, size=lateral.shape[-2:], mode="nearest")
            if self._fuse_type == "avg":
                prev = prev / 2
            results.insert(0, self.output_convs[idx](prev))
        if self.top_block is not None:
            if self.top_block.in_feature in bottom_up_features:
                top_input = bottom_up_features[self.top_block.in_feature]
            else:
                top_input = results[self._out_features.index(self.top_block.in_feature)]
            results.extend(self.top_block(top_input))
        return dict(zip(self._out_features, results))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }


def _output_block_from_cfg(cfg: CfgNode, involution: bool) -> OutputBlockFactory:
    if not involution:
        return conv_output_block(cfg.MODEL.FPN.NORM)
    inv = cfg.MODEL.INVOLUTION
    return involution_output_block(
        inv.KERNEL_SIZE, inv.GROUP_CHANNELS, inv.REDUCTION_RATIO, cfg.MODEL.FPN.INVOLUTION_NORM
    )


def _build_fpn(cfg: CfgNode, input_shape: ShapeSpec, involution: bool, retinanet: bool) -> FPN:
    bottom_up = build_rednet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    if retinanet:
        if "res5" not in bottom_up.output_shape():
            raise ValueError(
                "RetinaNet FPN: MODEL.REDNET.OUT_FEATURES must include 'res5' (P6 is computed "
                f"from C5), got {list(cfg.MODEL.REDNET.OUT_FEATURES)}"
            )
        top_block = LastLevelP6P7(
            bottom_up.output_shape()["res5"].channels,
            out_channels,
            relu_before_p7=cfg.MODEL.FPN.RELU_BEFORE_P7,
        )
    else:
        top_block = LastLevelMaxPool()
    return FPN(
        bottom_up,
        cfg.MODEL.FPN.IN_FEATURES,
        out_channels,
        output_block=_output_block_from_cfg(cfg, involution),
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_rednet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """RedNet + conv FPN + max-pool P6 (Faster/Mask R-CNN, semantic FPN)."""
    return _build_fpn(cfg, input_shape, involution=False, retinanet=False)


@BACKBONE_REGISTRY.register()
def build_rednet_involution_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """RedNet + involution FPN (the paper's "neck = involution") + max-pool P6."""
    return _build_fpn(cfg, input_shape, involution=True, retinanet=False)


@BACKBONE_REGISTRY.register()
def build_retinanet_rednet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """RedNet + conv FPN (from ``MODEL.FPN.IN_FEATURES``, usually res3..res5) + P6/P7 from C5."""
    return _build_fpn(cfg, input_shape, involution=False, retinanet=True)


@BACKBONE_REGISTRY.register()
def build_retinanet_rednet_involution_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """RedNet + involution FPN + P6/P7 from C5 (the official involution-neck RetinaNet)."""
    return _build_fpn(cfg, input_shape, involution=True, retinanet=True)
