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

The max-pool has no parameters (``stem.maxpool``). Norms are chosen by Detectron2 name plus
``"FrozenStatsBN"`` (see :mod:`d2_involution.layers.norm`); ``freeze(at)`` converts the frozen
part's BatchNorms to ``FrozenBatchNorm2d`` exactly as Detectron2's ResNet does.
"""

from typing import Dict, List, Optional, Sequence

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import CfgNode
from detectron2.layers import CNNBlockBase, ShapeSpec
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.build import BACKBONE_REGISTRY
from torch import nn
from torch.nn import functional as F

from ..layers import ConvNormAct, Involution, get_norm

__all__ = [
    "REDNET_DEPTHS",
    "RedNetStem",
    "RedNetBlock",
    "RedNet",
    "build_rednet",
    "build_rednet_backbone",
]

#: blocks per stage (res2, res3, res4, res5) for each supported depth.
REDNET_DEPTHS: Dict[int, Sequence[int]] = {
    26: (1, 2, 4, 1),
    38: (2, 3, 5, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}

_STAGE_NAMES = ("res2", "res3", "res4", "res5")


def _apply_norm(norm: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


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
        if out_channels % 2 != 0:
            raise ValueError(f"RedNetStem: out_channels must be even, got {out_channels}")
        mid = out_channels // 2
        self.conv1 = ConvNormAct(in_channels, mid, 3, stride=2, padding=1, bias=False, norm=norm)
        self.involution = Involution(
            mid,
            kernel_size=involution_kernel,
            group_channels=group_channels,
            reduction_ratio=reduction_ratio,
            norm=norm,
        )
        self.bn = get_norm(norm, mid)
        self.conv2 = ConvNormAct(mid, out_channels, 3, stride=1, padding=1, bias=False, norm=norm)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = F.relu(_apply_norm(self.bn, self.involution(x)))
        x = self.conv2(x)
        return self.maxpool(x)


class RedNetBlock(CNNBlockBase):
    """RedNet bottleneck: 1x1 conv, Involution (carries stride/dilation), 1x1 conv, residual add."""

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
    ):
        super().__init__(in_channels, out_channels, stride)
        self.conv1 = nn.Conv2d(in_channels, bottleneck_channels, 1, bias=False)
        self.bn1 = get_norm(norm, bottleneck_channels)
        self.conv2 = Involution(
            bottleneck_channels,
            kernel_size=kernel_size,
            stride=stride,
            group_channels=group_channels,
            reduction_ratio=reduction_ratio,
            norm=norm,
            dilation=dilation,
        )
        self.bn2 = get_norm(norm, bottleneck_channels)
        self.conv3 = nn.Conv2d(bottleneck_channels, out_channels, 1, bias=False)
        self.bn3 = get_norm(norm, out_channels)
        if stride != 1 or in_channels != out_channels:
            layers = [nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)]
            shortcut_norm = get_norm(norm, out_channels)
            if shortcut_norm is not None:
                layers.append(shortcut_norm)
            self.downsample = nn.Sequential(*layers)
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(_apply_norm(self.bn1, self.conv1(x)))
        out = F.relu(_apply_norm(self.bn2, self.conv2(out)))
        out = _apply_norm(self.bn3, self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class RedNet(Backbone):
    """RedNet backbone: a stem and stages ``res2..res5`` of :class:`RedNetBlock`.

    Mirrors Detectron2's ``ResNet``: ``forward`` returns the requested ``out_features`` (any of
    ``stem``, ``res2``..``res5``); stages deeper than the deepest requested one are not built;
    ``freeze(at)`` freezes the stem (1) and stages up to ``res{at}``.
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: List[List[CNNBlockBase]],
        out_features: Sequence[str],
        freeze_at: int = 0,
    ):
        super().__init__()
        self.stem = stem
        current_stride = stem.stride
        self._out_feature_strides = {"stem": current_stride}
        self._out_feature_channels = {"stem": stem.out_channels}
        self.stage_names: List[str] = []
        self.stages: List[nn.Sequential] = []
        for name, blocks in zip(_STAGE_NAMES, stages):
            if not blocks:
                raise ValueError(f"RedNet: stage {name} has no blocks")
            stage = nn.Sequential(*blocks)
            self.add_module(name, stage)
            self.stage_names.append(name)
            self.stages.append(stage)
            for block in blocks:
                current_stride *= block.stride
            self._out_feature_strides[name] = current_stride
            self._out_feature_channels[name] = blocks[-1].out_channels
        unknown = [f for f in out_features if f not in self._out_feature_strides]
        if not out_features or unknown:
            raise ValueError(
                f"RedNet: out_features must be a non-empty subset of "
                f"{list(self._out_feature_strides)}, got {list(out_features)}"
            )
        self._out_features = list(out_features)
        self.freeze(freeze_at)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"RedNet: expected input (N, C, H, W), got {tuple(x.shape)}")
        outputs = {}
        x = self.stem(x)
        if "stem" in self._out_features:
            outputs["stem"] = x
        for name, stage in zip(self.stage_names, self.stages):
            x = stage(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }

    def freeze(self, freeze_at: int = 0) -> "RedNet":
        """Freeze the stem (``freeze_at >= 1``) and stage ``res{k}`` for every ``k <= freeze_at``.

        Frozen parameters get ``requires_grad=False`` and frozen BatchNorms (including
        FrozenStatsBN and SyncBN) become ``FrozenBatchNorm2d``, as in Detectron2's ResNet.
        """
        if not isinstance(freeze_at, int) or freeze_at < 0 or freeze_at > 5:
            raise ValueError(f"RedNet.freeze: freeze_at must be an int in [0, 5], got {freeze_at}")
        if freeze_at >= 1:
            self.stem.freeze()
        for idx, stage in enumerate(self.stages, start=2):
            if freeze_at >= idx:
                for block in stage.children():
                    block.freeze()
        return self

    @staticmethod
    def make_stage(
        block_class: type, num_blocks: int, *, in_channels: int, out_channels: int, **kwargs
    ) -> List[CNNBlockBase]:
        """Blocks of one stage; a ``*_per_block`` keyword gives one value per block (as ResNet)."""
        blocks = []
        for i in range(num_blocks):
            block_kwargs = {}
            for key, value in kwargs.items():
                if key.endswith("_per_block"):
                    if len(value) != num_blocks:
                        raise ValueError(
                            f"RedNet.make_stage: {key} must have num_blocks={num_blocks} "
                            f"values, got {len(value)}"
                        )
                    block_kwargs[key[: -len("_per_block")]] = value[i]
                else:
                    block_kwargs[key] = value
            blocks.append(
                block_class(in_channels=in_channels, out_channels=out_channels, **block_kwargs)
            )
            in_channels = out_channels
        return blocks


def _make_stages(
    depth: int,
    *,
    stem_out_channels: int = 64,
    res2_out_channels: int = 256,
    num_stages: int = 4,
    res5_dilation: int = 1,
    kernel_size: int = 7,
    group_channels: int = 16,
    reduction_ratio: int = 4,
    norm: str = "BN",
) -> List[List[CNNBlockBase]]:
    in_channels = stem_out_channels
    out_channels = res2_out_channels
    stages = []
    for idx, num_blocks in enumerate(REDNET_DEPTHS[depth][:num_stages]):
        dilation = res5_dilation if idx == 3 else 1
        first_stride = 1 if idx == 0 or dilation > 1 else 2
        stages.append(
            RedNet.make_stage(
                RedNetBlock,
                num_blocks,
                in_channels=in_channels,
                out_channels=out_channels,
                bottleneck_channels=out_channels // 4,
                stride_per_block=[first_stride] + [1] * (num_blocks - 1),
                dilation=dilation,
                kernel_size=kernel_size,
                group_channels=group_channels,
                reduction_ratio=reduction_ratio,
                norm=norm,
            )
        )
        in_channels = out_channels
        out_channels *= 2
    return stages


def _init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    """Official init: Kaiming (fan_out, ReLU) convs, norms 1/0, last norm of each block 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            weight_init.c2_msra_fill(module)
        elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
    if zero_init_residual:
        for module in model.modules():
            if isinstance(module, RedNetBlock) and module.bn3 is not None:
                if getattr(module.bn3, "weight", None) is not None:
                    nn.init.zeros_(module.bn3.weight)


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
) -> RedNet:
    """Build RedNet-``depth`` without a config (used by the config builder and the classifier).

    ``stem_involution_kernel`` is 3 for the ImageNet classifiers and 7 for the official
    detection/segmentation backbones; ``res5_dilation`` 2 keeps res5 at stride 16.
    """
    if depth not in REDNET_DEPTHS:
        raise ValueError(f"RedNet: depth must be one of {sorted(REDNET_DEPTHS)}, got {depth!r}")
    if res5_dilation not in (1, 2):
        raise ValueError(f"RedNet: res5_dilation must be 1 or 2, got {res5_dilation!r}")
    if isinstance(out_features, str):
        raise TypeError(f"RedNet: out_features must be a list of names, got str {out_features!r}")
    allowed = ("stem",) + _STAGE_NAMES
    bad = [f for f in out_features if f not in allowed]
    if not out_features or bad:
        raise ValueError(
            f"RedNet: out_features must be a non-empty subset of {list(allowed)}, "
            f"got {list(out_features)}"
        )
    if stem_out_channels % 4 != 0 or res2_out_channels % 4 != 0:
        raise ValueError(
            "RedNet: stem_out_channels and res2_out_channels must be multiples of 4, got "
            f"{stem_out_channels} and {res2_out_channels}"
        )
    get_norm(norm, 64)  # fail early with a clear message on an unknown norm
    if norm == "GN":
        raise ValueError(
            "RedNet: norm 'GN' (32 groups) does not fit the involution kernel generators, which "
            "have 8..128 channels; use 'BN', 'SyncBN', 'FrozenBN' or 'FrozenStatsBN'"
        )
    num_stages = max(allowed.index(f) for f in out_features)
    stem = RedNetStem(
        in_channels,
        stem_out_channels,
        involution_kernel=stem_involution_kernel,
        group_channels=group_channels,
        reduction_ratio=reduction_ratio,
        norm=norm,
    )
    stages = _make_stages(
        depth,
        stem_out_channels=stem_out_channels,
        res2_out_channels=res2_out_channels,
        num_stages=num_stages,
        res5_dilation=res5_dilation,
        kernel_size=kernel_size,
        group_channels=group_channels,
        reduction_ratio=reduction_ratio,
        norm=norm,
    )
    model = RedNet(stem, stages, out_features=out_features)
    _init_weights(model, zero_init_residual)
    return model.freeze(freeze_at)


@BACKBONE_REGISTRY.register()
def build_rednet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> RedNet:
    """RedNet from ``MODEL.REDNET``, ``MODEL.INVOLUTION`` and ``MODEL.BACKBONE.FREEZE_AT``."""
    r = cfg.MODEL.REDNET
    inv = cfg.MODEL.INVOLUTION
    return build_rednet(
        r.DEPTH,
        stem_involution_kernel=r.STEM_INVOLUTION_KERNEL,
        norm=r.NORM,
        out_features=list(r.OUT_FEATURES),
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        res5_dilation=r.RES5_DILATION,
        kernel_size=inv.KERNEL_SIZE,
        group_channels=inv.GROUP_CHANNELS,
        reduction_ratio=inv.REDUCTION_RATIO,
        zero_init_residual=r.ZERO_INIT_RESIDUAL,
        stem_out_channels=r.STEM_OUT_CHANNELS,
        res2_out_channels=r.RES2_OUT_CHANNELS,
        in_channels=input_shape.channels,
    )
