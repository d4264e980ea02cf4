"""nn.Modules built on the involution operator, and normalisation by name."""

from .involution import (
    GENERATOR_INITS,
    ConvNormAct,
    Involution,
    fuse_by_default,
    init_kernel_generators,
)
from .norm import FrozenStatsBatchNorm2d, get_norm_layer

__all__ = [
    "ConvNormAct",
    "FrozenStatsBatchNorm2d",
    "GENERATOR_INITS",
    "Involution",
    "fuse_by_default",
    "get_norm_layer",
    "init_kernel_generators",
]
