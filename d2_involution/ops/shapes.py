"""The involution op's shape rules, and the checks that guard its kernels.

The custom ops (``torch.ops.d2_involution.involution``, ``involution_grad_input``,
``involution_grad_weight``, ``involution_fused``, ``involution_fused_backward``) can be called
directly, so each op checks its tensors once, with the function of the same name here, before any
kernel runs: inconsistent shapes raise a ``ValueError``
naming the argument instead of letting a kernel read out of bounds. The kernels trust their inputs.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "SUPPORTED_DTYPES",
    "check_forward",
    "check_fused",
    "check_fused_backward",
    "check_grad_input",
    "check_grad_weight",
    "involution_output_size",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def involution_output_size(
    size: int, kernel_size: int, stride: int = 1, padding: Optional[int] = None, dilation: int = 1
) -> int:
    """Output extent along one axis (the convolution formula)."""
    if padding is None:
        padding = dilation * (kernel_size - 1) // 2
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def dims(t: Tensor) -> Tuple[int, ...]:
    """The shape; plain ints under ``torch.jit`` tracing, where sizes are otherwise traced."""
    if torch.jit.is_tracing():
        return tuple(int(d) for d in t.shape)
    return tuple(t.shape)


def _shape(op: str, name: str, t: Tensor, layout: str) -> Tuple[int, ...]:
    ndim = layout.count(",") + 1
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    return dims(t)


def _check_tensors(op: str, a: Tuple[str, Tensor], b: Tuple[str, Tensor]) -> None:
    """Both of a supported dtype, the same dtype and on the same device."""
    for name, t in (a, b):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{op}: {name} has dtype {t.dtype}; expected one of "
                f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}"
            )
    (na, ta), (nb, tb) = a, b
    if ta.device != tb.device:
        raise ValueError(
            f"{op}: {na} and {nb} must be on the same device, got {na} on {ta.device} and "
            f"{nb} on {tb.device}"
        )
    if ta.dtype != tb.dtype:
        raise TypeError(
            f"{op}: {na} and {nb} must have the same dtype, got {na} {ta.dtype} and "
            f"{nb} {tb.dtype}"
        )


def _check_ints(op: str, **values_and_minimums: Tuple[int, int]) -> None:
    for name, (value, minimum) in values_and_minimums.items():
        if value < minimum:
            raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")


def _check_kernel_size(op: str, K: int, K2: int, weight_shape) -> None:
    if K != K2 or K < 1 or K % 2 == 0:
        raise ValueError(
            f"{op}: weight must be (N, G, K, K, Ho, Wo) with K a positive odd int, got "
            f"shape {tuple(weight_shape)}"
        )


def _check_groups(op: str, C: int, G: int, channels_of: str, groups_of: str) -> None:
    if G < 1 or C % G != 0:
        raise ValueError(f"{op}: the channels of {channels_of} must be divisible by {groups_of}")


def _groups_of_weight(G: int, weight_shape) -> str:
    return f"the groups of weight ({G}, shape {tuple(weight_shape)})"


def _check_batch(op: str, n_a: int, a_name: str, a_shape, n_b: int, b_name: str, b_shape) -> None:
    if n_a != n_b:
        raise ValueError(
            f"{op}: batch size of {a_name} ({n_a}, shape {tuple(a_shape)}) does not match "
            f"{b_name} ({n_b}, shape {tuple(b_shape)})"
        )


def _output_hw(
    op: str, H: int, W: int, K: int, stride: int, padding: int, dilation: int, x_shape
) -> Tuple[int, int]:
    Ho = involution_output_size(H, K, stride, padding, dilation)
    Wo = involution_output_size(W, K, stride, padding, dilation)
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"{op}: an input of shape {tuple(x_shape)} is too small for K={K}, stride={stride}, "
            f"padding={padding}, dilation={dilation} (output would be {Ho}x{Wo})"
        )
    return Ho, Wo


def check_forward(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int) -> None:
    """``involution(x, weight)``: x (N, C, H, W), weight (N, G, K, K, Ho, Wo) of the output size."""
    op = "involution"
    N, C, H, W = _shape(op, "x", x, "(N, C, H, W)")
    Nw, G, K, K2, Ho, Wo = _shape(op, "weight", weight, "(N, G, K, K, Ho, Wo)")
    _check_tensors(op, ("x", x), ("weight", weight))
    _check_kernel_size(op, K, K2, weight.shape)
    _check_ints(op, stride=(stride, 1), dilation=(dilation, 1), padding=(padding, 0))
    _check_groups(op, C, G, f"x ({C}, shape {tuple(x.shape)})", _groups_of_weight(G, weight.shape))
    _check_batch(op, Nw, "weight", weight.shape, N, "x", x.shape)
    expected = _output_hw(op, H, W, K, stride, padding, dilation, x.shape)
    if (Ho, Wo) != expected:
        raise ValueError(
            f"{op}: weight spatial size ({Ho}, {Wo}) (shape {tuple(weight.shape)}) does not "
            f"match the output size {expected} of x with shape {tuple(x.shape)}, K={K}, "
            f"stride={stride}, padding={padding}, dilation={dilation}"
        )


def check_grad_input(
    grad_out: Tensor,
    weight: Tensor,
    height: int,
    width: int,
    stride: int,
    padding: int,
    dilation: int,
) -> None:
    """``involution_grad_input``: grad_out (N, C, Ho, Wo) and weight (N, G, K, K, Ho, Wo) agree,
    and (Ho, Wo) is the output size of a (height, width) input."""
    op = "involution_grad_input"
    N, C, Ho, Wo = _shape(op, "grad_out", grad_out, "(N, C, Ho, Wo)")
    Nw, G, K, K2, Hw, Ww = _shape(op, "weight", weight, "(N, G, K, K, Ho, Wo)")
    _check_tensors(op, ("grad_out", grad_out), ("weight", weight))
    _check_kernel_size(op, K, K2, weight.shape)
    _check_ints(
        op,
        height=(height, 1),
        width=(width, 1),
        stride=(stride, 1),
        dilation=(dilation, 1),
        padding=(padding, 0),
    )
    _check_groups(
        op,
        C,
        G,
        f"grad_out ({C}, shape {tuple(grad_out.shape)})",
        _groups_of_weight(G, weight.shape),
    )
    _check_batch(op, Nw, "weight", weight.shape, N, "grad_out", grad_out.shape)
    if (Hw, Ww) != (Ho, Wo):
        raise ValueError(
            f"{op}: weight spatial size ({Hw}, {Ww}) (shape {tuple(weight.shape)}) does not "
            f"match grad_out's ({Ho}, {Wo}) (shape {tuple(grad_out.shape)})"
        )
    expected = _output_hw(op, height, width, K, stride, padding, dilation, (height, width))
    if expected != (Ho, Wo):
        raise ValueError(
            f"{op}: grad_out spatial size ({Ho}, {Wo}) does not match the output size {expected} "
            f"of a {height}x{width} input with K={K}, stride={stride}, padding={padding}, "
            f"dilation={dilation}"
        )


def check_grad_weight(
    grad_out: Tensor,
    x: Tensor,
    groups: int,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
) -> None:
    """``involution_grad_weight``: grad_out (N, C, Ho, Wo) is the output of x (N, C, H, W)."""
    op = "involution_grad_weight"
    N, C, Ho, Wo = _shape(op, "grad_out", grad_out, "(N, C, Ho, Wo)")
    Nx, Cx, H, W = _shape(op, "x", x, "(N, C, H, W)")
    _check_tensors(op, ("grad_out", grad_out), ("x", x))
    _check_ints(op, stride=(stride, 1), dilation=(dilation, 1), padding=(padding, 0))
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{op}: kernel_size must be a positive odd int, got {kernel_size}")
    _check_groups(
        op, C, groups, f"grad_out ({C}, shape {tuple(grad_out.shape)})", f"groups ({groups})"
    )
    _check_batch(op, Nx, "x", x.shape, N, "grad_out", grad_out.shape)
    expected = _output_hw(op, H, W, kernel_size, stride, padding, dilation, x.shape)
    if Cx != C or expected != (Ho, Wo):
        raise ValueError(
            f"{op}: grad_out (shape {tuple(grad_out.shape)}) must be (N, C, Ho, Wo) = "
            f"({Nx}, {Cx}, {expected[0]}, {expected[1]}) for x of shape {tuple(x.shape)}, "
            f"K={kernel_size}, stride={stride}, padding={padding}, dilation={dilation}"
        )


def check_fused(
    x: Tensor,
    reduced: Tensor,
    gen_weight: Tensor,
    gen_bias: Tensor,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
) -> Tuple[int, int, int]:
    """``involution_fused``: x (N, C, H, W), reduced (N, R, Ho, Wo) of the output size, gen_weight
    (K*K*G, R) or (K*K*G, R, 1, 1), gen_bias (K*K*G,). Returns (G, Ho, Wo)."""
    op = "involution_fused"
    N, C, H, W = _shape(op, "x", x, "(N, C, H, W)")
    Nr, R, Ho, Wo = _shape(op, "reduced", reduced, "(N, R, Ho, Wo)")
    for name, t in (("reduced", reduced), ("gen_weight", gen_weight), ("gen_bias", gen_bias)):
        _check_tensors(op, ("x", x), (name, t))
    K = kernel_size
    if K < 1 or K % 2 == 0:
        raise ValueError(f"{op}: kernel_size must be a positive odd int, got {K}")
    M = dims(gen_weight)[0] if gen_weight.dim() > 0 else 0
    if dims(gen_weight) not in ((M, R), (M, R, 1, 1)) or M == 0 or M % (K * K) != 0:
        raise ValueError(
            f"{op}: gen_weight must be (K*K*G, R) or (K*K*G, R, 1, 1) with K={K} and R={R} "
            f"(the channels of reduced), got shape {tuple(gen_weight.shape)}"
        )
    if dims(gen_bias) != (M,):
        raise ValueError(
            f"{op}: gen_bias must have shape ({M},) (one per generated weight), got "
            f"{tuple(gen_bias.shape)}"
        )
    _check_ints(op, stride=(stride, 1), dilation=(dilation, 1), padding=(padding, 0))
    G = M // (K * K)
    _check_groups(
        op,
        C,
        G,
        f"x ({C}, shape {tuple(x.shape)})",
        f"the groups of gen_weight ({G} = {M} / K^2, shape {tuple(gen_weight.shape)})",
    )
    _check_batch(op, Nr, "reduced", reduced.shape, N, "x", x.shape)
    expected = _output_hw(op, H, W, K, stride, padding, dilation, x.shape)
    if (Ho, Wo) != expected:
        raise ValueError(
            f"{op}: reduced spatial size ({Ho}, {Wo}) (shape {tuple(reduced.shape)}) does not "
            f"match the output size {expected} of x with shape {tuple(x.shape)}, K={K}, "
            f"stride={stride}, padding={padding}, dilation={dilation}"
        )
    return G, Ho, Wo


def check_fused_backward(
    grad_out: Tensor,
    x: Tensor,
    reduced: Tensor,
    gen_weight: Tensor,
    gen_bias: Tensor,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
) -> None:
    """``involution_fused_backward``: the forward's arguments (:func:`check_fused`) and grad_out
    of the forward's output shape (N, C, Ho, Wo)."""
    op = "involution_fused_backward"
    _, Ho, Wo = check_fused(
        x, reduced, gen_weight, gen_bias, kernel_size, stride, padding, dilation
    )
    _shape(op, "grad_out", grad_out, "(N, C, Ho, Wo)")
    _check_tensors(op, ("grad_out", grad_out), ("x", x))
    expected = (x.shape[0], x.shape[1], Ho, Wo)
    if dims(grad_out) != expected:
        raise ValueError(
            f"{op}: grad_out must have the forward output's shape {expected}, got "
            f"{tuple(grad_out.shape)}"
        )
