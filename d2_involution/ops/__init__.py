"""The involution operator (CUDA kernels through CuPy, a C++ CPU kernel, a pure-PyTorch path).

Needs only PyTorch (and CuPy for CUDA tensors); detectron2 is not imported.
"""

from .involution import (
    SUPPORTED_DTYPES,
    generate_weights,
    has_fused_kernel,
    involution,
    involution_fused,
    involution_output_size,
    involution_pytorch,
    pure_pytorch_trace,
)

__all__ = [
    "SUPPORTED_DTYPES",
    "generate_weights",
    "has_fused_kernel",
    "involution",
    "involution_fused",
    "involution_output_size",
    "involution_pytorch",
    "pure_pytorch_trace",
]
