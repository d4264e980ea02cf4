"""Involution heads for R-CNN and the UPerNet semantic-segmentation head.

* :class:`InvolutionRPNHead` (``RPN_HEAD_REGISTRY``): Detectron2's ``StandardRPNHead`` with its 3x3
  conv replaced by ``Involution(C, 7, 1)`` + ReLU (official ``RPNHead_involution``). Names:
  ``conv.involution.*`` (official ``rpn_head.rpn_conv.*``), ``objectness_logits`` (``rpn_cls``),
  ``anchor_deltas`` (``rpn_reg``).
* :class:`InvolutionMaskHead` (``ROI_MASK_HEAD_REGISTRY``): ``MaskRCNNConvUpsampleHead`` with each
  3x3 conv replaced by ``Involution(C, 7, 1)`` + ReLU (official ``FCNMaskHead_involution``). Names:
  ``mask_fcn{k}.involution.*`` (official ``mask_head.convs.{k-1}.0.*``), ``deconv``
  (``upsample``), ``predictor`` (``conv_logits``).
* :class:`UPerNetHead` (``SEM_SEG_HEADS_REGISTRY``): UPerNet (Xiao et al., ECCV'18) as configured
  by the official RedNet segmentation models (mmseg ``UPerHead`` + auxiliary ``FCNHead``): pyramid
  pooling on the last feature, FPN fusion, a 3x3 fusion conv, and in training an auxiliary FCN
  loss on ``AUX_IN_FEATURE``. Names (mmseg in brackets): ``psp.stages.{i}.1.{conv,bn}``
  (``decode_head.psp_modules.{i}.1``), ``psp.bottleneck`` (``bottleneck``), ``lateral_convs.{i}``,
  ``fpn_convs.{i}``, ``fpn_bottleneck``, ``predictor`` (``conv_seg``), ``aux_convs.{i}``
  (``auxiliary_head.convs.{i}``), ``aux_predictor`` (``auxiliary_head.conv_seg``).
"""

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import ConvTranspose2d, ShapeSpec
from detectron2.modeling.meta_arch.semantic_seg import SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY, StandardRPNHead
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, BaseMaskRCNNHead
from torch import nn
from torch.nn import functional as F

from ..layers import ConvNormAct, Involution, get_norm

__all__ = ["InvolutionRPNHead", "InvolutionMaskHead", "UPerNetHead"]


def _involution_relu(
    channels: int,
    kernel_size: int,
    group_channels: int,
    reduction_ratio: int,
    generator_norm: str,
    out_norm: str = "",
) -> nn.Sequential:
    """``Involution(C, K, 1)`` [+ norm] + ReLU, convs initialised as mmcv's ConvModule does."""
    layers = OrderedDict()
    layers["involution"] = Involution(
        channels,
        kernel_size=kernel_size,
        stride=1,
        group_channels=group_channels,
        reduction_ratio=reduction_ratio,
        norm=generator_norm,
    )
    norm = get_norm(out_norm, channels)
    if norm is not None:
        layers["norm"] = norm
    layers["relu"] = nn.ReLU()
    block = nn.Sequential(layers)
    for module in block.modules():
        if isinstance(module, nn.Conv2d):
            weight_init.c2_msra_fill(module)
    return block


def _involution_kwargs(cfg, norm: str) -> dict:
    inv = cfg.MODEL.INVOLUTION
    return {
        "kernel_size": inv.KERNEL_SIZE,
        "group_channels": inv.GROUP_CHANNELS,
        "reduction_ratio": inv.REDUCTION_RATIO,
        "involution_norm": norm,
    }


@RPN_HEAD_REGISTRY.register()
class InvolutionRPNHead(StandardRPNHead):
    """RPN head whose shared 3x3 conv is an involution (+ ReLU); outputs as ``StandardRPNHead``."""

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_anchors: int,
        box_dim: int = 4,
        conv_dims: Sequence[int] = (-1,),
        kernel_size: int = 7,
        group_channels: int = 16,
        reduction_ratio: int = 4,
        involution_norm: str = "BN",
    ):
        bad = [d for d in conv_dims if d not in (-1, in_channels)]
        if len(conv_dims) < 1 or bad:
            raise ValueError(
                "InvolutionRPNHead: an involution keeps the channel count, so MODEL.RPN.CONV_DIMS "
                f"must be -1 or in_channels={in_channels} for every layer, got {list(conv_dims)}"
            )
        super().__init__(in_channels=in_channels, num_anchors=num_anchors, box_dim=box_dim)
        blocks = [
            _involution_relu(
                in_channels, kernel_size, group_channels, reduction_ratio, involution_norm
            )
            for _ in conv_dims
        ]
        self.conv = blocks[0] if len(blocks) == 1 else nn.Sequential(*blocks)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]) -> dict:
        ret = super().from_config(cfg, input_shape)
        ret.update(_involution_kwargs(cfg, cfg.MODEL.RPN.INVOLUTION_NORM))
        return ret


@ROI_MASK_HEAD_REGISTRY.register()
class InvolutionMaskHead(BaseMaskRCNNHead, nn.Sequential):
    """Mask head: N x (Involution + ReLU), 2x2 deconv + ReLU, 1x1 predictor; Mask R-CNN losses."""

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        num_classes: int,
        conv_dims: Sequence[int],
        conv_norm: str = "",
        kernel_size: int = 7,
        group_channels: int = 16,
        reduction_ratio: int = 4,
        involution_norm: str = "BN",
        **kwargs,
    ):
        super().__init__(**kwargs)
        channels = input_shape.channels
        if len(conv_dims) < 1:
            raise ValueError("InvolutionMaskHead: conv_dims must be non-empty")
        bad = [d for d in conv_dims[:-1] if d != channels]
        if bad:
            raise ValueError(
                "InvolutionMaskHead: an involution keeps the channel count, so "
                f"MODEL.ROI_MASK_HEAD.CONV_DIM must equal the input channels ({channels}), "
                f"got conv_dims {list(conv_dims)}"
            )
        for k in range(len(conv_dims) - 1):
            self.add_module(
                f"mask_fcn{k + 1}",
                _involution_relu(
                    channels,
                    kernel_size,
                    group_channels,
                    reduction_ratio,
                    involution_norm,
                    conv_norm,
                ),
            )
        self.deconv = ConvTranspose2d(channels, conv_dims[-1], kernel_size=2, stride=2, padding=0)
        self.add_module("deconv_relu", nn.ReLU())
        self.predictor = nn.Conv2d(conv_dims[-1], num_classes, kernel_size=1)
        weight_init.c2_msra_fill(self.deconv)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec) -> dict:
        ret = super().from_config(cfg, input_shape)
        head = cfg.MODEL.ROI_MASK_HEAD
        ret.update(
            input_shape=input_shape,
            conv_dims=[head.CONV_DIM] * (head.NUM_CONV + 1),
            conv_norm=head.NORM,
            num_classes=1 if head.CLS_AGNOSTIC_MASK else cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            **_involution_kwargs(cfg, head.INVOLUTION_NORM),
        )
        return ret

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x)
        return x


class _PyramidPooling(nn.Module):
    """PSP module: adaptive average pools at ``scales``, 1x1 conv each, upsampled and concatenated
    with the input, then a 3x3 bottleneck conv (mmseg ``UPerHead.psp_modules`` + ``bottleneck``).
    """

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int], norm: str):
        super().__init__()
        self.scales = tuple(scales)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(in_channels, channels, norm=norm))
            for s in self.scales
        )
        self.bottleneck = ConvNormAct(
            in_channels + len(self.scales) * channels, channels, 3, padding=1, norm=norm
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False)
            for stage in self.stages
        ]
        return self.bottleneck(torch.cat([x] + pooled, dim=1))


@SEM_SEG_HEADS_REGISTRY.register()
class UPerNetHead(nn.Module):
    """UPerNet decode head with an auxiliary FCN head (training only).

    In training returns ``(None, {"loss_sem_seg", "loss_sem_seg_aux"})``; in inference
    ``(logits upsampled to the input resolution, {})``, like Detectron2's ``SemSegFPNHead``.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        in_features: Sequence[str],
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        norm: str = "BN",
        dropout: float = 0.1,
        loss_weight: float = 1.0,
        ignore_value: int = -1,
        aux_in_feature: Optional[str] = "res4",
        aux_channels: int = 256,
        aux_num_convs: int = 1,
        aux_loss_weight: float = 0.4,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"UPerNetHead: num_classes must be >= 1, got {num_classes}")
        missing = [f for f in in_features if f not in input_shape]
        if not in_features or missing:
            raise ValueError(
                f"UPerNetHead: in_features must be a non-empty subset of the backbone outputs "
                f"{list(input_shape)}, got {list(in_features)}"
            )
        if not pool_scales or any(int(s) < 1 for s in pool_scales):
            raise ValueError(f"UPerNetHead: pool_scales must be positive ints, got {pool_scales}")
        self.in_features = sorted(in_features, key=lambda f: input_shape[f].stride)
        self.common_stride = input_shape[self.in_features[0]].stride
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        self.aux_loss_weight = aux_loss_weight

        shapes = [input_shape[f] for f in self.in_features]
        self.psp = _PyramidPooling(shapes[-1].channels, channels, pool_scales, norm)
        self.lateral_convs = nn.ModuleList(
            ConvNormAct(s.channels, channels, norm=norm) for s in shapes[:-1]
        )
        self.fpn_convs = nn.ModuleList(
            ConvNormAct(channels, channels, 3, padding=1, norm=norm) for _ in shapes[:-1]
        )
        self.fpn_bottleneck = ConvNormAct(len(shapes) * channels, channels, 3, padding=1, norm=norm)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.predictor = nn.Conv2d(channels, num_classes, kernel_size=1)

        self.aux_in_feature = aux_in_feature if aux_loss_weight > 0 else None
        if self.aux_in_feature is not None:
            if self.aux_in_feature not in input_shape:
                raise ValueError(
                    f"UPerNetHead: aux_in_feature must be one of the backbone outputs "
                    f"{list(input_shape)}, got {aux_in_feature!r}"
                )
            if aux_num_convs < 1:
                raise ValueError(f"UPerNetHead: aux_num_convs must be >= 1, got {aux_num_convs}")
            aux_in = input_shape[self.aux_in_feature].channels
            self.aux_convs = nn.Sequential(
                *[
                    ConvNormAct(
                        aux_in if i == 0 else aux_channels, aux_channels, 3, 1, 1, norm=norm
                    )
                    for i in range(aux_num_convs)
                ]
            )
            self.aux_dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
            self.aux_predictor = nn.Conv2d(aux_channels, num_classes, kernel_size=1)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                weight_init.c2_msra_fill(module)
        for predictor in (self.predictor, getattr(self, "aux_predictor", None)):
            if predictor is not None:
                nn.init.normal_(predictor.weight, std=0.01)
                nn.init.zeros_(predictor.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> dict:
        head = cfg.MODEL.SEM_SEG_HEAD
        up = head.UPERNET
        return {
            "input_shape": input_shape,
            "num_classes": head.NUM_CLASSES,
            "in_features": list(head.IN_FEATURES),
            "channels": up.CHANNELS,
            "pool_scales": list(up.POOL_SCALES),
            "norm": head.NORM,
            "dropout": up.DROPOUT,
            "loss_weight": head.LOSS_WEIGHT,
            "ignore_value": head.IGNORE_VALUE,
            "aux_in_feature": up.AUX_IN_FEATURE or None,
            "aux_channels": up.AUX_CHANNELS,
            "aux_num_convs": up.AUX_NUM_CONVS,
            "aux_loss_weight": up.AUX_LOSS_WEIGHT,
        }

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits at the stride of the finest in-feature."""
        inputs = [features[f] for f in self.in_features]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs[:-1])]
        laterals.append(self.psp(inputs[-1]))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="bilinear", align_corners=False
            )
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [
            F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in outs[1:]
        ]
        x = self.fpn_bottleneck(torch.cat(outs, dim=1))
        return self.predictor(self.dropout(x))

    def forward(
        self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None
    ) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        logits = self.layers(features)
        if self.training:
            if targets is None:
                raise ValueError("UPerNetHead: targets are required in training")
            losses = {"loss_sem_seg": self._loss(logits, targets) * self.loss_weight}
            if self.aux_in_feature is not None:
                aux = self.aux_predictor(
                    self.aux_dropout(self.aux_convs(features[self.aux_in_feature]))
                )
                losses["loss_sem_seg_aux"] = self._loss(aux, targets) * self.aux_loss_weight
            return None, losses
        logits = F.interpolate(
            logits, scale_factor=self.common_stride, mode="bilinear", align_corners=False
        )
        return logits, {}

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(
            logits.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False
        )
        return F.cross_entropy(logits, targets, reduction="mean", ignore_index=self.ignore_value)
