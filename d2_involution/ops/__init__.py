"""The involution operator (CUDA kernels through CuPy, a C++ CPU kernel, a pure-PyTorch path).

Needs only PyTorch (and CuPy for CUDA tensors); detectron2 is not imported.
"""

from .involution import (
    SUPPORTED_DTYPES,
    involution,
    involution_output_size,
    involution_pytorch,
    pure_pytorch_trace,
)

__all__ = [
    "SUPPORTED_DTYPES",
    "involution",
    "involution_output_size",
    "involution_pytorch",
    "pure_pytorch_trace",
]
