"""RedNet backbones, involution FPNs and heads, registered with Detectron2's registries."""
