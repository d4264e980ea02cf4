"""RedNet backbones, involution FPNs and heads, registered with Detectron2's registries."""

from .rednet import REDNET_DEPTHS, RedNet, RedNetBlock, RedNetStem, build_rednet

__all__ = ["REDNET_DEPTHS", "RedNet", "RedNetBlock", "RedNetStem", "build_rednet"]
