"""nn.Modules built on the involution operator, and normalisation by name."""

from .involution import ConvNormAct, Involution
from .norm import FrozenStatsBatchNorm2d, get_norm_layer

__all__ = ["ConvNormAct", "FrozenStatsBatchNorm2d", "Involution", "get_norm_layer"]
