"""nn.Modules built on the involution operator, and normalisation by name."""

from .involution import ConvNormAct, Involution, fuse_by_default
from .norm import FrozenStatsBatchNorm2d, get_norm_layer

__all__ = [
    "ConvNormAct",
    "FrozenStatsBatchNorm2d",
    "Involution",
    "fuse_by_default",
    "get_norm_layer",
]
