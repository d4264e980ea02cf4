"""``InvolutionRPNHead``: Detectron2's ``StandardRPNHead`` with its 3x3 conv an involution.

The official ``RPNHead_involution``: the shared conv is ``Involution(C, 7, 1)`` + ReLU. Names:
``conv.involution.*`` (official ``rpn_head.rpn_conv.*``), ``objectness_logits`` (``rpn_cls``),
``anchor_deltas`` (``rpn_reg``); outputs as ``StandardRPNHead``.
"""

from typing import List, Sequence

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY, StandardRPNHead
from torch import nn

from .involution_blocks import involution_args, involution_relu

__all__ = ["InvolutionRPNHead"]


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
        generator_init: str = "official",
    ):
        bad = [d for d in conv_dims if d not in (-1, in_channels)]
        if len(conv_dims) < 1 or bad:
            raise ValueError(
                "InvolutionRPNHead: an involution keeps the channel count, so MODEL.RPN.CONV_DIMS "
                f"must be -1 or in_channels={in_channels} for every layer, got {list(conv_dims)}"
            )
        super().__init__(in_channels=in_channels, num_anchors=num_anchors, box_dim=box_dim)
        blocks = [
            involution_relu(
                in_channels,
                kernel_size=kernel_size,
                group_channels=group_channels,
                reduction_ratio=reduction_ratio,
                generator_norm=involution_norm,
                generator_init=generator_init,
            )
            for _ in conv_dims
        ]
        self.conv = blocks[0] if len(blocks) == 1 else nn.Sequential(*blocks)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]) -> dict:
        ret = super().from_config(cfg, input_shape)
        ret.update(involution_args(cfg), involution_norm=cfg.MODEL.RPN.INVOLUTION_NORM)
        return ret
