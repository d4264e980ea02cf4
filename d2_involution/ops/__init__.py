"""The involution operator (CUDA kernels through CuPy, and a CPU path)."""
from .involution import involution, involution_output_size

__all__ = ["involution", "involution_output_size"]
