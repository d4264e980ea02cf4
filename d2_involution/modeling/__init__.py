"""RedNet backbones, involution FPNs and heads, registered with Detectron2's registries.

RedNet is Detectron2's ``ResNet`` with a :class:`RedNetStem` and :class:`RedNetBlock` stages; the
FPN builders return Detectron2's ``FPN``; each head is a Detectron2 head with its convs swapped.
"""

from .fpn import (
    LastLevelP6P7WithoutReLU,
    build_rednet_fpn_backbone,
    build_rednet_involution_fpn_backbone,
    build_retinanet_rednet_fpn_backbone,
    build_retinanet_rednet_involution_fpn_backbone,
    use_involution_outputs,
)
from .involution_blocks import involution_args, involution_relu
from .mask_head import InvolutionMaskHead
from .rednet import (
    REDNET_DEPTHS,
    RedNetBlock,
    RedNetStem,
    build_rednet,
    build_rednet_backbone,
    make_rednet_stages,
)
from .rpn_head import InvolutionRPNHead
from .upernet_head import UPerNetHead

__all__ = [
    "InvolutionMaskHead",
    "InvolutionRPNHead",
    "LastLevelP6P7WithoutReLU",
    "REDNET_DEPTHS",
    "RedNetBlock",
    "RedNetStem",
    "UPerNetHead",
    "build_rednet",
    "build_rednet_backbone",
    "build_rednet_fpn_backbone",
    "build_rednet_involution_fpn_backbone",
    "build_retinanet_rednet_fpn_backbone",
    "build_retinanet_rednet_involution_fpn_backbone",
    "involution_args",
    "involution_relu",
    "make_rednet_stages",
    "use_involution_outputs",
]
