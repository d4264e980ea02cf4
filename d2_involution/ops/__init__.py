"""The involution operator (CUDA kernels through CuPy, a C++ CPU kernel, a pure-PyTorch path)."""

from .involution import (
    SUPPORTED_DTYPES,
    generate_weights,
    involution,
    involution_fused,
    involution_output_size,
    involution_pytorch,
    pure_pytorch_trace,
)

__all__ = [
    "SUPPORTED_DTYPES",
    "generate_weights",
    "involution",
    "involution_fused",
    "involution_output_size",
    "involution_pytorch",
    "pure_pytorch_trace",
]
