"""``involution(x, weight)``: per-pixel, per-group spatial kernels applied to a feature map.

out[n, c, i, j] = sum_{u,v<K} weight[n, g(c), u, v, i, j] * x[n, c, i*s + u*d - p, j*s + v*d - p]
with g(c) = c // (C // G) (contiguous channel groups, as the official code), zero padding p
(default d*(K-1)/2) and Ho = floor((H + 2p - d(K-1) - 1) / s) + 1 (likewise Wo).

How PyTorch sees it:

* ``torch.ops.d2_involution.involution`` is a ``torch.library`` custom op with a fake kernel, so
  ``torch.compile`` and ``torch.export`` treat it as one opaque node. Its backward calls two more
  custom ops, ``involution_grad_input`` and ``involution_grad_weight``.
* Kernels: CuPy/NVRTC kernels on CUDA tensors (``cuda_kernel.py``), a C++ kernel on CPU tensors
  (``cpu_kernel.py``), and :func:`involution_pytorch` (plain tensor ops, no unfold) elsewhere or
  when the C++ kernel cannot be built.
* Autocast (CUDA and CPU): both inputs are cast to the autocast dtype and the kernel runs in it
  (accumulating in fp32); there is no silent fall-back to an fp32 op.
* ``torch.jit.trace`` records the custom op as one node (fvcore's ``FlopCountAnalysis`` counts it
  through ``d2_involution.ops.flops``; the traced module runs wherever ``d2_involution`` is
  imported). ONNX export, and tracing inside :func:`pure_pytorch_trace`, record
  :func:`involution_pytorch` instead, i.e. only standard operators.
"""

import contextlib
import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from . import cpu_kernel

__all__ = [
    "generate_weights",
    "involution",
    "involution_fused",
    "involution_output_size",
    "involution_pytorch",
    "pure_pytorch_trace",
    "SUPPORTED_DTYPES",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_AUTOCAST_DEVICES = ("cuda", "cpu")
_pure_trace_depth = 0


def involution_output_size(
    size: int, kernel_size: int, stride: int = 1, padding: Optional[int] = None, dilation: int = 1
) -> int:
    """Output extent along one axis (the convolution formula)."""
    if padding is None:
        padding = dilation * (kernel_size - 1) // 2
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


@contextlib.contextmanager
def pure_pytorch_trace() -> Iterator[None]:
    """Within this block, ``torch.jit.trace`` records standard operators instead of the custom op.

    Use it to save a TorchScript module that runs without d2_involution installed.
    """
    global _pure_trace_depth
    _pure_trace_depth += 1
    try:
        yield
    finally:
        _pure_trace_depth -= 1


def _record_pure_path() -> bool:
    if torch.onnx.is_in_onnx_export():
        return True
    return _pure_trace_depth > 0 and torch.jit.is_tracing()


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"involution: {name} must be an int, got {type(value).__name__} ({value!r})"
        )
    if value < minimum:
        raise ValueError(f"involution: {name} must be >= {minimum}, got {value}")
    return value


def _dims(t: Tensor) -> Tuple[int, ...]:
    """The shape; plain ints under ``torch.jit`` tracing, where sizes are otherwise traced."""
    if torch.jit.is_tracing():
        return tuple(int(d) for d in t.shape)
    return tuple(t.shape)


def _check_tensors(op: str, tensors: Dict[str, Tensor]) -> None:
    """Types, dtypes and devices of the op's tensor arguments (same device, same dtype)."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in tensors.items():
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{op}: {name} has dtype {t.dtype}; expected one of "
                f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}"
            )
    (first, x), *others = tensors.items()
    for name, t in others:
        if x.device != t.device:
            raise ValueError(
                f"{op}: {first} and {name} must be on the same device, got {first} on {x.device} "
                f"and {name} on {t.device}"
            )
    autocasting = x.device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(x.device.type)
    for name, t in others:
        if x.dtype != t.dtype and not autocasting:
            raise TypeError(
                f"{op}: {first} and {name} must have the same dtype, got {first} {x.dtype} and "
                f"{name} {t.dtype}"
            )


def _check_args(
    x: Tensor, weight: Tensor, stride: int, padding: Optional[int], dilation: int
) -> Tuple[int, int, int]:
    """Validate the inputs at the boundary; returns (stride, padding, dilation) with padding set."""
    _check_tensors("involution", {"x": x, "weight": weight})
    if x.dim() != 4:
        raise ValueError(f"involution: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 6:
        raise ValueError(
            f"involution: weight must be 6-D (N, G, K, K, Ho, Wo), got shape {tuple(weight.shape)}"
        )
    Nw, G, K, K2, Ho, Wo = _dims(weight)
    if K != K2 or K < 1 or K % 2 == 0:
        raise ValueError(
            "involution: weight must be (N, G, K, K, Ho, Wo) with K a positive odd int, got "
            f"shape {tuple(weight.shape)}"
        )
    stride = _check_int("stride", stride, 1)
    dilation = _check_int("dilation", dilation, 1)
    padding = _check_int("padding", dilation * (K - 1) // 2 if padding is None else padding, 0)
    groups = f"the groups of weight ({G}, shape {tuple(weight.shape)})"
    _check_geometry(x, K, G, groups, ("weight", Nw, Ho, Wo, weight), stride, padding, dilation)
    return stride, padding, dilation


def _check_geometry(
    x: Tensor, K: int, G: int, groups: str, kernels: tuple, stride: int, padding: int, dilation: int
) -> None:
    """x against G groups (described by ``groups``) and a kernel grid ``kernels`` = (name, batch,
    height, width, tensor) for kernel size K and the given stride, padding and dilation."""
    name, Nw, Ho, Wo, t = kernels
    N, C, H, W = _dims(x)
    if G < 1 or C % G != 0:
        raise ValueError(
            f"involution: the channels of x ({C}, shape {tuple(x.shape)}) must be divisible by "
            f"{groups}"
        )
    if Nw != N:
        raise ValueError(
            f"involution: batch size of {name} ({Nw}, shape {tuple(t.shape)}) does not match "
            f"x ({N}, shape {tuple(x.shape)})"
        )
    exp_h = involution_output_size(H, K, stride, padding, dilation)
    exp_w = involution_output_size(W, K, stride, padding, dilation)
    if exp_h < 1 or exp_w < 1:
        raise ValueError(
            f"involution: x of shape {tuple(x.shape)} is too small for K={K}, stride={stride}, "
            f"padding={padding}, dilation={dilation} (output would be {exp_h}x{exp_w})"
        )
    if (Ho, Wo) != (exp_h, exp_w):
        raise ValueError(
            f"involution: {name} spatial size ({Ho}, {Wo}) (shape {tuple(t.shape)}) does not "
            f"match the output size ({exp_h}, {exp_w}) of x with shape {tuple(x.shape)}, K={K}, "
            f"stride={stride}, padding={padding}, dilation={dilation}"
        )


def involution(
    x: Tensor,
    weight: Tensor,
    stride: int = 1,
    padding: Optional[int] = None,
    dilation: int = 1,
) -> Tensor:
    """Apply involution. x: (N, C, H, W); weight: (N, G, K, K, Ho, Wo). Returns (N, C, Ho, Wo).

    Differentiable in both inputs. Runs the CUDA kernels on CUDA tensors and the C++ kernel on CPU
    tensors; see the module docstring for compile, autocast, tracing and export.
    """
    stride, padding, dilation = _check_args(x, weight, stride, padding, dilation)
    if _record_pure_path():
        return involution_pytorch(x, weight, stride, padding, dilation)
    return torch.ops.d2_involution.involution(x, weight, stride, padding, dilation)


# ---------------------------------------------------------------------------------------------
# Pure-PyTorch path: K*K strided views of the padded input, accumulated in place of an unfold.
# Peak extra memory: the padded input plus one output-sized product.


def _shifted_views(xp: Tensor, K: int, Ho: int, Wo: int, stride: int, dilation: int):
    """Yields (u, v, view of the padded xp under tap (u, v)), each view of shape (..., Ho, Wo)."""
    for u in range(K):
        for v in range(K):
            hs, ws = u * dilation, v * dilation
            he, we = hs + (Ho - 1) * stride + 1, ws + (Wo - 1) * stride + 1
            yield u, v, xp[..., hs:he:stride, ws:we:stride]


def involution_pytorch(
    x: Tensor, weight: Tensor, stride: int = 1, padding: Optional[int] = None, dilation: int = 1
) -> Tensor:
    """Involution with standard tensor ops only (traceable, exportable, differentiable by autograd).

    Low-precision inputs are accumulated in fp32.
    """
    stride, padding, dilation = _check_args(x, weight, stride, padding, dilation)
    N, C, H, W = _dims(x)
    _, G, K, _, Ho, Wo = _dims(weight)
    acc = torch.promote_types(x.dtype, torch.float32)
    xg = x.reshape(N, G, C // G, H, W)
    out = torch.zeros((N, G, C // G, Ho, Wo), dtype=acc, device=x.device)
    xp = torch.nn.functional.pad(xg, (padding,) * 4)
    for u, v, patch in _shifted_views(xp, K, Ho, Wo, stride, dilation):
        out = out + patch.to(acc) * weight[:, :, u, v].unsqueeze(2).to(acc)
    return out.reshape(N, C, Ho, Wo).to(x.dtype)


def _pytorch_grad_input(
    grad_out: Tensor, weight: Tensor, H: int, W: int, stride: int, padding: int, dilation: int
) -> Tensor:
    N, C, Ho, Wo = grad_out.shape
    G, K = weight.shape[1], weight.shape[2]
    acc = torch.promote_types(grad_out.dtype, torch.float32)
    go = grad_out.reshape(N, G, C // G, Ho, Wo).to(acc)
    gxp = torch.zeros((N, G, C // G, H + 2 * padding, W + 2 * padding), dtype=acc, device=go.device)
    for u, v, view in _shifted_views(gxp, K, Ho, Wo, stride, dilation):
        view.add_(go * weight[:, :, u, v].unsqueeze(2).to(acc))
    gx = gxp[..., padding : padding + H, padding : padding + W]
    return gx.reshape(N, C, H, W).to(grad_out.dtype)


def _pytorch_grad_weight(
    grad_out: Tensor, x: Tensor, G: int, K: int, stride: int, padding: int, dilation: int
) -> Tensor:
    N, C, Ho, Wo = grad_out.shape
    acc = torch.promote_types(grad_out.dtype, torch.float32)
    go = grad_out.reshape(N, G, C // G, Ho, Wo).to(acc)
    xg = x.reshape(N, G, C // G, x.shape[2], x.shape[3])
    gw = torch.empty((N, G, K, K, Ho, Wo), dtype=acc, device=x.device)
    xp = torch.nn.functional.pad(xg, (padding,) * 4)
    for u, v, patch in _shifted_views(xp, K, Ho, Wo, stride, dilation):
        gw[:, :, u, v] = (go * patch.to(acc)).sum(2)
    return gw.to(grad_out.dtype)


# ---------------------------------------------------------------------------------------------
# Kernels per device. fp16/bf16 on the CPU run the fp32 C++ kernel (fp32 accumulation). On CPU
# tensors every output keeps the layout of the feature map it is computed from (NCHW or
# channels_last, ``cpu_kernel.layout``); the CUDA kernels return NCHW tensors.


def _cpu_kernel_dtype(dtype: torch.dtype) -> Optional[torch.dtype]:
    if not cpu_kernel.available():
        return None
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _kernel_dtype(t: Tensor) -> Optional[torch.dtype]:
    """The C++ kernel's dtype for t, or None where it does not run (not on the CPU, not built)."""
    return _cpu_kernel_dtype(t.dtype) if t.device.type == "cpu" else None


def _layout(t: Tensor) -> str:
    """The layout of the outputs computed from feature map t (see above)."""
    return cpu_kernel.layout(t) if t.device.type == "cpu" else "nchw"


def _as_map_of(out: Tensor, like: Tensor) -> Tensor:
    return out.contiguous(memory_format=cpu_kernel.memory_format(_layout(like)))


def _as_weight_of(gw: Tensor, like: Tensor) -> Tensor:
    lay = _layout(like)
    return gw if lay == "nchw" else cpu_kernel.empty_weight(gw.shape, lay, gw).copy_(gw)


def _forward_default(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
    kdt = _kernel_dtype(x)
    if kdt is None:
        return _as_map_of(involution_pytorch(x, weight, stride, padding, dilation), x)
    out = cpu_kernel.forward(x.to(kdt), weight.to(kdt), stride, padding, dilation)
    return out.to(x.dtype)


def _grad_input_default(
    grad_out: Tensor, weight: Tensor, H: int, W: int, stride: int, padding: int, dilation: int
) -> Tensor:
    kdt = _kernel_dtype(grad_out)
    if kdt is None:
        gx = _pytorch_grad_input(grad_out, weight, H, W, stride, padding, dilation)
        return _as_map_of(gx, grad_out)
    gx = cpu_kernel.grad_input(grad_out.to(kdt), weight.to(kdt), H, W, stride, padding, dilation)
    return gx.to(grad_out.dtype)


def _grad_weight_default(
    grad_out: Tensor, x: Tensor, G: int, K: int, stride: int, padding: int, dilation: int
) -> Tensor:
    kdt = _kernel_dtype(x)
    if kdt is None:
        gw = _pytorch_grad_weight(grad_out, x, G, K, stride, padding, dilation)
        return _as_weight_of(gw, x)
    gw = cpu_kernel.grad_weight(grad_out.to(kdt), x.to(kdt), G, K, stride, padding, dilation)
    return gw.to(grad_out.dtype)


# ---------------------------------------------------------------------------------------------
# The custom ops.


@torch.library.custom_op("d2_involution::involution", mutates_args=())
def _involution_op(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
    return _forward_default(x, weight, stride, padding, dilation)


@torch.library.custom_op("d2_involution::involution_grad_input", mutates_args=())
def _grad_input_op(
    grad_out: Tensor,
    weight: Tensor,
    height: int,
    width: int,
    stride: int,
    padding: int,
    dilation: int,
) -> Tensor:
    return _grad_input_default(grad_out, weight, height, width, stride, padding, dilation)


@torch.library.custom_op("d2_involution::involution_grad_weight", mutates_args=())
def _grad_weight_op(
    grad_out: Tensor,
    x: Tensor,
    groups: int,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
) -> Tensor:
    return _grad_weight_default(grad_out, x, groups, kernel_size, stride, padding, dilation)


_warned_no_cuda_kernels = False


def _cuda_kernels_usable(cuda_kernel) -> bool:
    """True when the CuPy kernels can run; else warns once (the pure-PyTorch path is used)."""
    global _warned_no_cuda_kernels
    if cuda_kernel.available():
        return True
    if not _warned_no_cuda_kernels:
        _warned_no_cuda_kernels = True
        warnings.warn(
            "d2_involution: the CUDA involution kernels are unavailable "
            f"({cuda_kernel.unavailable_reason()}); using the slower pure-PyTorch path. "
            "Install CuPy for your CUDA version (e.g. pip install cupy-cuda12x).",
            RuntimeWarning,
            stacklevel=2,
        )
    return False


@_involution_op.register_kernel("cuda")
def _involution_cuda(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
    from . import cuda_kernel

    if not _cuda_kernels_usable(cuda_kernel):
        return involution_pytorch(x, weight, stride, padding, dilation)
    return cuda_kernel.forward(x, weight, stride, padding, dilation)


@_grad_input_op.register_kernel("cuda")
def _grad_input_cuda(
    grad_out: Tensor,
    weight: Tensor,
    height: int,
    width: int,
    stride: int,
    padding: int,
    dilation: int,
) -> Tensor:
    from . import cuda_kernel

    if not _cuda_kernels_usable(cuda_kernel):
        return _pytorch_grad_input(grad_out, weight, height, width, stride, padding, dilation)
    return cuda_kernel.grad_input(grad_out, weight, height, width, stride, padding, dilation)


@_grad_weight_op.register_kernel("cuda")
def _grad_weight_cuda(
    grad_out: Tensor,
    x: Tensor,
    groups: int,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
) -> Tensor:
    from . import cuda_kernel

    if not _cuda_kernels_usable(cuda_kernel):
        return _pytorch_grad_weight(grad_out, x, groups, kernel_size, stride, padding, dilation)
    return cuda_kernel.grad_weight(grad_out, x, groups, kernel_size, stride, padding, dilation)


@_involution_op.register_fake
def _involution_fake(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
    return _as_map_of(x.new_empty((x.shape[0], x.shape[1], weight.shape[4], weight.shape[5])), x)


@_grad_input_op.register_fake
def _grad_input_fake(
    grad_out: Tensor,
    weight: Tensor,
    height: int,
    width: int,
    stride: int,
    padding: int,
    dilation: int,
) -> Tensor:
    gx = grad_out.new_empty((grad_out.shape[0], grad_out.shape[1], height, width))
    return _as_map_of(gx, grad_out)


@_grad_weight_op.register_fake
def _grad_weight_fake(
    grad_out: Tensor,
    x: Tensor,
    groups: int,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
) -> Tensor:
    N, _, Ho, Wo = grad_out.shape
    shape = (N, groups, kernel_size, kernel_size, Ho, Wo)
    return cpu_kernel.empty_weight(shape, _layout(x), grad_out)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (stride, padding, dilation)


def _backward(ctx, grad_out: Tensor):
    x, weight = ctx.saved_tensors
    grad_x = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_x = _grad_input_op(grad_out, weight, x.shape[2], x.shape[3], *ctx.geometry)
    if ctx.needs_input_grad[1]:
        grad_weight = _grad_weight_op(grad_out, x, weight.shape[1], weight.shape[2], *ctx.geometry)
    return grad_x, grad_weight, None, None, None


_involution_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Fused kernel generation: ``involution_fused(x, reduced, gen_weight, gen_bias, kernel_size)``
# equals ``involution(x, weight)`` with weight = the 1x1 convolution (gen_weight, gen_bias) of
# reduced, reshaped to (N, G, K, K, Ho, Wo); the C++ kernels compute those weights inside the
# aggregation (per image and group, in a per-thread scratch) and never write them into a tensor;
# the backward regenerates them.


def _check_fused_args(
    x: Tensor,
    reduced: Tensor,
    gen_weight: Tensor,
    gen_bias: Tensor,
    kernel_size: int,
    stride: int,
    padding: Optional[int],
    dilation: int,
) -> Tuple[int, int, int]:
    """Validate the fused op's inputs; returns (stride, padding, dilation) with padding set."""
    op = "involution_fused"
    tensors = {"x": x, "reduced": reduced, "gen_weight": gen_weight, "gen_bias": gen_bias}
    _check_tensors(op, tensors)
    for name, t, dims in (("x", x, "(N, C, H, W)"), ("reduced", reduced, "(N, R, Ho, Wo)")):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D {dims}, got shape {tuple(t.shape)}")
    K = _check_int("kernel_size", kernel_size, 1)
    if K % 2 == 0:
        raise ValueError(f"{op}: kernel_size must be a positive odd int, got {K}")
    R = _dims(reduced)[1]
    M = _dims(gen_weight)[0] if gen_weight.dim() > 0 else 0
    if tuple(_dims(gen_weight)) not in ((M, R), (M, R, 1, 1)) or M == 0 or M % (K * K) != 0:
        raise ValueError(
            f"{op}: gen_weight must be (K*K*G, R) or (K*K*G, R, 1, 1) with K={K} and R={R} "
            f"(the channels of reduced), got shape {tuple(gen_weight.shape)}"
        )
    if tuple(_dims(gen_bias)) != (M,):
        raise ValueError(
            f"{op}: gen_bias must have shape ({M},) (one per generated weight), got "
            f"{tuple(gen_bias.shape)}"
        )
    stride = _check_int("stride", stride, 1)
    dilation = _check_int("dilation", dilation, 1)
    padding = _check_int("padding", dilation * (K - 1) // 2 if padding is None else padding, 0)
    G = M // (K * K)
    groups = f"the groups of gen_weight ({G} = {M} / K^2, shape {tuple(gen_weight.shape)})"
    N, _, Ho, Wo = _dims(reduced)
    kernels = ("reduced", N, Ho, Wo, reduced)
    _check_geometry(x, K, G, groups, kernels, stride, padding, dilation)
    return stride, padding, dilation


def generate_weights(
    reduced: Tensor, gen_weight: Tensor, gen_bias: Tensor, kernel_size: int
) -> Tensor:
    """The (N, G, K, K, Ho, Wo) weights the fused op generates: a 1x1 convolution of reduced."""
    M, R = gen_weight.shape[0], reduced.shape[1]
    w = torch.nn.functional.conv2d(reduced, gen_weight.reshape(M, R, 1, 1), gen_bias)
    N, _, Ho, Wo = _dims(w)
    # reshape, not view: under channels_last the generated kernels are not NCHW-contiguous.
    return w.reshape(N, M // (kernel_size * kernel_size), kernel_size, kernel_size, Ho, Wo)


def involution_fused(
    x: Tensor,
    reduced: Tensor,
    gen_weight: Tensor,
    gen_bias: Tensor,
    kernel_size: int,
    stride: int = 1,
    padding: Optional[int] = None,
    dilation: int = 1,
) -> Tensor:
    """Involution with fused kernel generation. x: (N, C, H, W); reduced: (N, R, Ho, Wo) (the
    kernel generator's reduced features); gen_weight: (K*K*G, R) or (K*K*G, R, 1, 1) and gen_bias
    (K*K*G,): the generator's last 1x1 convolution. Returns (N, C, Ho, Wo).

    Equals ``involution(x, generate_weights(reduced, gen_weight, gen_bias, kernel_size))``,
    differentiable in all four tensors. On CPU tensors the C++ kernels generate the weights inside
    the aggregation; elsewhere (CUDA: no fused kernel yet), when the C++ kernel is unavailable,
    and in ONNX export or :func:`pure_pytorch_trace`, it runs exactly that unfused computation.
    """
    stride, padding, dilation = _check_fused_args(
        x, reduced, gen_weight, gen_bias, kernel_size, stride, padding, dilation
    )
    if _record_pure_path():
        weight = generate_weights(reduced, gen_weight, gen_bias, kernel_size)
        return involution_pytorch(x, weight, stride, padding, dilation)
    if x.device.type != "cpu":
        weight = generate_weights(reduced, gen_weight, gen_bias, kernel_size)
        return torch.ops.d2_involution.involution(x, weight, stride, padding, dilation)
    return torch.ops.d2_involution.involution_fused(
        x, reduced, gen_weight, gen_bias, kernel_size, stride, padding, dilation
    )


@torch.library.custom_op("d2_involution::involution_fused", mutates_args=())
def _fused_op(
    x: Tensor,
    reduced: Tensor,
    gen_weight: Tensor,
    gen_bias: Tensor,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
) -> Tensor:
    kdt = _kernel_dtype(x)
    if kdt is None:
        weight = generate_weights(reduced, gen_weight, gen_bias, kernel_size)
        return _as_map_of(_involution_op(x, weight, stride, padding, dilation), x)
    args = (t.to(kdt) for t in (x, reduced, gen_weight, gen_bias))
    out = cpu_kernel.fused_forward(*args, kernel_size, stride, padding, dilation)
    return out.to(x.dtype)


@torch.library.custom_op("d2_involution::involution_fused_backward", mutates_args=())
def _fused_backward_op(
    grad_out: Tensor,
    x: Tensor,
    reduced: Tensor,
    gen_weight: Tensor,
    gen_bias: Tensor,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
) -> List[Tensor]:
    kdt = _kernel_dtype(x)
    geometry = (stride, padding, dilation)
    if kdt is None:
        grads = _fused_backward_unfused(
            grad_out, x, reduced, gen_weight, gen_bias, kernel_size, geometry
        )
    else:
        args = (t.to(kdt) for t in (grad_out, x, reduced, gen_weight, gen_bias))
        grads = cpu_kernel.fused_backward(*args, kernel_size, *geometry)
    gx, gred, gA, gb = (g.to(t.dtype) for g, t in zip(grads, (x, reduced, gen_weight, gen_bias)))
    return [_as_map_of(gx, x), _as_map_of(gred, x), gA.contiguous(), gb.contiguous()]


def _fused_backward_unfused(grad_out, x, reduced, gen_weight, gen_bias, K, geometry):
    """The fused op's gradients through the unfused ops (devices without a fused kernel)."""
    weight = generate_weights(reduced, gen_weight, gen_bias, K)
    N, G, _, _, Ho, Wo = weight.shape
    M, R = G * K * K, reduced.shape[1]
    gx = _grad_input_op(grad_out, weight, x.shape[2], x.shape[3], *geometry)
    gw = _grad_weight_op(grad_out, x, G, K, *geometry).reshape(N, M, Ho, Wo)
    acc = torch.promote_types(gw.dtype, torch.float32)
    gw, red, A = gw.to(acc), reduced.to(acc), gen_weight.reshape(M, R).to(acc)
    gred = torch.einsum("nmij,mr->nrij", gw, A)
    gA = torch.einsum("nmij,nrij->mr", gw, red).reshape(gen_weight.shape)
    return gx, gred, gA, gw.sum((0, 2, 3))


@_fused_op.register_fake
def _fused_fake(x, reduced, gen_weight, gen_bias, kernel_size, stride, padding, dilation):
    N, C = x.shape[:2]
    return _as_map_of(x.new_empty((N, C, reduced.shape[2], reduced.shape[3])), x)


@_fused_backward_op.register_fake
def _fused_backward_fake(grad_out, x, reduced, gen_weight, gen_bias, *args):
    return [
        _as_map_of(torch.empty_like(x), x),
        _as_map_of(torch.empty_like(reduced), x),
        torch.empty_like(gen_weight, memory_format=torch.contiguous_format),
        torch.empty_like(gen_bias, memory_format=torch.contiguous_format),
    ]


def _fused_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:4])
    ctx.geometry = inputs[4:]


def _fused_backward(ctx, grad_out: Tensor):
    grads = _fused_backward_op(grad_out, *ctx.saved_tensors, *ctx.geometry)
    return (*grads, None, None, None, None)


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)


def _register_autocast(op_name: str, device_type: str) -> None:
    """Under autocast, cast the floating inputs to the autocast dtype (not a fixed one) and run the
    op."""
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)
    op = getattr(torch.ops.d2_involution, op_name).default

    def cast(t):
        dtype = torch.get_autocast_dtype(device_type)
        floating = (torch.float32, torch.float16, torch.bfloat16)
        return t.to(dtype) if isinstance(t, Tensor) and t.dtype in floating else t

    def run(*args):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*(cast(a) for a in args))

    op.py_impl(key)(run)
    _LIB.impl(op_name, lambda _keyset, *args: run(*args), key_name, with_keyset=True)


_LIB = torch.library.Library("d2_involution", "IMPL")
for _op_name in ("involution", "involution_fused"):
    for _device in _AUTOCAST_DEVICES:
        _register_autocast(_op_name, _device)
