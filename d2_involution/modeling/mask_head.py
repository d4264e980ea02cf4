"""``InvolutionMaskHead``: Detectron2's ``MaskRCNNConvUpsampleHead`` with involution layers.

The official ``FCNMaskHead_involution``: each 3x3 conv + ReLU ``mask_fcn{k}`` is
``Involution(C, 7, 1)`` [+ norm] + ReLU; the deconv, predictor, losses and inference are
Detectron2's. Names: ``mask_fcn{k}.involution.*`` (official ``mask_head.convs.{k-1}.0.*``),
``deconv`` (``upsample``), ``predictor`` (``conv_logits``).
"""

from typing import Sequence

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    MaskRCNNConvUpsampleHead,
)

from .involution_blocks import involution_args, involution_relu

__all__ = ["InvolutionMaskHead"]


@ROI_MASK_HEAD_REGISTRY.register()
class InvolutionMaskHead(MaskRCNNConvUpsampleHead):
    """``MaskRCNNConvUpsampleHead`` whose ``mask_fcn{k}`` are involutions (+ norm) + ReLU."""

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
        generator_init: str = "official",
        **kwargs,
    ):
        channels = input_shape.channels
        if len(conv_dims) < 1 or any(d != channels for d in conv_dims[:-1]):
            raise ValueError(
                "InvolutionMaskHead: an involution keeps the channel count, so "
                f"MODEL.ROI_MASK_HEAD.CONV_DIM must equal the input channels ({channels}), "
                f"got conv_dims {list(conv_dims)}"
            )
        super().__init__(
            input_shape, num_classes=num_classes, conv_dims=conv_dims, conv_norm=conv_norm, **kwargs
        )
        for k in range(1, len(conv_dims)):
            block = involution_relu(
                channels,
                kernel_size=kernel_size,
                group_channels=group_channels,
                reduction_ratio=reduction_ratio,
                generator_norm=involution_norm,
                out_norm=conv_norm,
                generator_init=generator_init,
            )
            setattr(self, f"mask_fcn{k}", block)
            self.conv_norm_relus[k - 1] = block

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec) -> dict:
        ret = super().from_config(cfg, input_shape)
        ret.update(involution_args(cfg), involution_norm=cfg.MODEL.ROI_MASK_HEAD.INVOLUTION_NORM)
        return ret
