"""Feature pyramids on RedNet: Detectron2's ``FPN``, with involution output blocks where configured.

Both necks of the paper are Detectron2's ``FPN`` on a RedNet: the conv FPN as it is, and the
involution FPN, in which :func:`use_involution_outputs` replaces each 3x3 output conv
``fpn_output{s}`` by ``Involution(256, 7, 1)`` under the same name (the official ``FPN_involution``
neck of d-li14/involution). Names, ``output_shape()`` and ``forward`` are Detectron2's: inputs must
be padded to ``size_divisibility`` (32), as Detectron2's meta-architectures do.

Module names: ``fpn_lateral{s}`` and ``fpn_output{s}`` for stage ``s`` (2..5),
``top_block.p6``/``top_block.p7`` for RetinaNet, ``bottom_up`` for the RedNet. The official mmdet
neck maps as ``neck.lateral_convs.{i}.conv`` -> ``fpn_lateral{i+s0}``, ``neck.fpn_convs.{i}`` ->
``fpn_output{i+s0}`` (an Involution: ``conv1.conv``, ``conv1.bn``, ``conv2.conv``) with s0 = 2 for
R-CNN necks and 3 for RetinaNet, whose ``neck.fpn_convs.3``/``.4`` are ``top_block.p6``/``p7``.
"""

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import FPN, Backbone
from detectron2.modeling.backbone.build import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from torch import nn

from ..layers import Involution, init_kernel_generators
from .involution_blocks import involution_args
from .rednet import build_rednet_backbone

__all__ = [
    "LastLevelP6P7WithoutReLU",
    "use_involution_outputs",
    "build_rednet_fpn_backbone",
    "build_rednet_involution_fpn_backbone",
    "build_retinanet_rednet_fpn_backbone",
    "build_retinanet_rednet_involution_fpn_backbone",
]


class LastLevelP6P7WithoutReLU(LastLevelP6P7):
    """Detectron2's ``LastLevelP6P7`` without the ReLU between P6 and P7.

    The official RedNet RetinaNet neck (mmdet ``relu_before_extra_convs=False``) computes
    ``P7 = conv(P6)``; Detectron2 computes ``conv(relu(P6))``. Names and init are Detectron2's.
    """

    def forward(self, c5: torch.Tensor) -> list:
        p6 = self.p6(c5)
        return [p6, self.p7(p6)]


def use_involution_outputs(
    fpn: FPN,
    *,
    kernel_size: int = 7,
    group_channels: int = 16,
    reduction_ratio: int = 4,
    norm: str = "BN",
    generator_init: str = "official",
) -> FPN:
    """Replace every output conv ``fpn_output{s}`` of ``fpn`` by ``Involution(C, K, 1)``, in place.

    The involution keeps the name, so ``FPN.forward`` calls it where it called the conv; ``norm``
    is the norm inside its kernel generator (BN in the official neck). Its convs get the Xavier
    fill that Detectron2's FPN gives its own, then ``generator_init``
    (:func:`~d2_involution.layers.init_kernel_generators`). Returns ``fpn``.
    """
    names = {id(module): name for name, module in fpn.named_children()}
    for idx, conv in enumerate(fpn.output_convs):
        block = Involution(
            conv.out_channels,
            kernel_size=kernel_size,
            stride=1,
            group_channels=group_channels,
            reduction_ratio=reduction_ratio,
            norm=norm,
        )
        for module in block.modules():
            if isinstance(module, nn.Conv2d):
                weight_init.c2_xavier_fill(module)
        init_kernel_generators(block, generator_init)
        setattr(fpn, names[id(conv)], block)
        fpn.output_convs[idx] = block
    return fpn


def _check_fpn_inputs(cfg: CfgNode, bottom_up: Backbone, retinanet: bool) -> None:
    """Clear errors for what Detectron2's FPN would only assert."""
    shapes = bottom_up.output_shape()
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    if not in_features or any(f not in shapes for f in in_features):
        raise ValueError(
            f"FPN: MODEL.FPN.IN_FEATURES must be a non-empty subset of MODEL.REDNET.OUT_FEATURES "
            f"{list(shapes)}, got {in_features}"
        )
    strides = [shapes[f].stride for f in in_features]
    if any(cur != 2 * prev for prev, cur in zip(strides[:-1], strides[1:])):
        raise ValueError(
            f"FPN: strides of MODEL.FPN.IN_FEATURES {in_features} must double level by level, "
            f"got {strides} (a dilated res5, MODEL.REDNET.RES5_DILATION 2, cannot feed an FPN)"
        )
    if cfg.MODEL.FPN.FUSE_TYPE not in ("sum", "avg"):
        raise ValueError(
            f"FPN: MODEL.FPN.FUSE_TYPE must be 'sum' or 'avg', got {cfg.MODEL.FPN.FUSE_TYPE!r}"
        )
    if retinanet and "res5" not in shapes:
        raise ValueError(
            "RetinaNet FPN: MODEL.REDNET.OUT_FEATURES must include 'res5' (P6 is computed from "
            f"C5), got {list(shapes)}"
        )


def _build_fpn(cfg: CfgNode, input_shape: ShapeSpec, involution: bool, retinanet: bool) -> FPN:
    bottom_up = build_rednet_backbone(cfg, input_shape)
    _check_fpn_inputs(cfg, bottom_up, retinanet)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    if not retinanet:
        top_block = LastLevelMaxPool()
    else:
        p6p7 = LastLevelP6P7 if cfg.MODEL.FPN.RELU_BEFORE_P7 else LastLevelP6P7WithoutReLU
        top_block = p6p7(bottom_up.output_shape()["res5"].channels, out_channels)
    fpn = FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
    if involution:
        use_involution_outputs(fpn, norm=cfg.MODEL.FPN.INVOLUTION_NORM, **involution_args(cfg))
    return fpn


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
