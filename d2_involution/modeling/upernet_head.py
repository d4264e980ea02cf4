"""``UPerNetHead``: UPerNet (Xiao et al., ECCV'18) as in the official RedNet segmentation models.

mmseg ``UPerHead`` + auxiliary ``FCNHead``: pyramid pooling on the last feature, FPN fusion, a 3x3
fusion conv, and in training an auxiliary FCN loss on ``AUX_IN_FEATURE``. A
``SEM_SEG_HEADS_REGISTRY`` head like Detectron2's ``SemSegFPNHead``. Names (mmseg in brackets):
``psp.stages.{i}.1.{conv,bn}`` (``decode_head.psp_modules.{i}.1``), ``psp.bottleneck``
(``bottleneck``), ``lateral_convs.{i}``, ``fpn_convs.{i}``, ``fpn_bottleneck``, ``predictor``
(``conv_seg``), ``aux_convs.{i}`` (``auxiliary_head.convs.{i}``), ``aux_predictor``
(``auxiliary_head.conv_seg``).
"""

from typing import Dict, Optional, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch.semantic_seg import SEM_SEG_HEADS_REGISTRY
from torch import nn
from torch.nn import functional as F

from ..layers import ConvNormAct

__all__ = ["UPerNetHead"]


def _check_upernet_args(
    input_shape: Dict[str, ShapeSpec],
    num_classes: int,
    in_features: Sequence[str],
    pool_scales: Sequence[int],
) -> None:
    if num_classes < 1:
        raise ValueError(f"UPerNetHead: num_classes must be >= 1, got {num_classes}")
    if not in_features or any(f not in input_shape for f in in_features):
        raise ValueError(
            f"UPerNetHead: in_features must be a non-empty subset of the backbone outputs "
            f"{list(input_shape)}, got {list(in_features)}"
        )
    if not pool_scales or any(int(s) < 1 for s in pool_scales):
        raise ValueError(f"UPerNetHead: pool_scales must be positive ints, got {pool_scales}")


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
        _check_upernet_args(input_shape, num_classes, in_features, pool_scales)
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
            self._add_auxiliary_head(input_shape, aux_channels, aux_num_convs, norm, dropout)
        self._init_weights()

    def _add_auxiliary_head(
        self,
        input_shape: Dict[str, ShapeSpec],
        channels: int,
        num_convs: int,
        norm: str,
        dropout: float,
    ) -> None:
        """The training-only FCN head on ``aux_in_feature`` (mmseg ``auxiliary_head``)."""
        if self.aux_in_feature not in input_shape:
            raise ValueError(
                f"UPerNetHead: aux_in_feature must be one of the backbone outputs "
                f"{list(input_shape)}, got {self.aux_in_feature!r}"
            )
        if num_convs < 1:
            raise ValueError(f"UPerNetHead: aux_num_convs must be >= 1, got {num_convs}")
        in_channels = input_shape[self.aux_in_feature].channels
        self.aux_convs = nn.Sequential(
            *[
                ConvNormAct(in_channels if i == 0 else channels, channels, 3, 1, 1, norm=norm)
                for i in range(num_convs)
            ]
        )
        self.aux_dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.aux_predictor = nn.Conv2d(channels, self.predictor.out_channels, kernel_size=1)

    def _init_weights(self) -> None:
        """mmseg's init: MSRA-filled convs, predictors N(0, 0.01) with zero bias."""
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
