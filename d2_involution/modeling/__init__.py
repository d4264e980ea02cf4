"""RedNet backbones, involution FPNs and heads, registered with Detectron2's registries."""

from .fpn import (
    FPN,
    LastLevelP6P7,
    build_rednet_fpn_backbone,
    build_rednet_involution_fpn_backbone,
    build_retinanet_rednet_fpn_backbone,
    build_retinanet_rednet_involution_fpn_backbone,
    conv_output_block,
    involution_output_block,
)
from .heads import InvolutionMaskHead, InvolutionRPNHead, UPerNetHead
from .rednet import (
    REDNET_DEPTHS,
    RedNet,
    RedNetBlock,
    RedNetStem,
    build_rednet,
    build_rednet_backbone,
)

__all__ = [
    "InvolutionMaskHead",
    "InvolutionRPNHead",
    "UPerNetHead",
    "FPN",
    "LastLevelP6P7",
    "REDNET_DEPTHS",
    "RedNet",
    "RedNetBlock",
    "RedNetStem",
    "build_rednet",
    "build_rednet_backbone",
    "build_rednet_fpn_backbone",
    "build_rednet_involution_fpn_backbone",
    "build_retinanet_rednet_fpn_backbone",
    "build_retinanet_rednet_involution_fpn_backbone",
    "conv_output_block",
    "involution_output_block",
]
