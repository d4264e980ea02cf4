"""``involution(x, weight)``: per-pixel, per-group spatial kernels applied to a feature map.

out[n, c, i, j] = sum_{u,v<K} weight[n, g(c), u, v, i, j] * x[n, c, i*s + u*d - p, j*s + v*d - p]
with g(c) = c // (C // G) (contiguous channel groups, as the official code), zero padding p
(default d*(K-1)/2) and Ho = floor((H + 2p - d(K-1) - 1) / s) + 1 (likewise Wo).

How PyTorch sees it:

* ``torch.ops.d2_involution.involution`` is a ``torch.library`` custom op with a fake kernel, so
  ``torch.compile`` and ``torch.export`` treat it as one opaque node. Its backward calls two more
  custom ops, ``involution_grad_input`` and ``involution_grad_weight``.
* Each op checks its tensors once (``shapes.py``), so the raw ops are safe to call directly, then
  runs one kernel set: the CuPy/NVRTC kernels on CUDA tensors (``cuda_kernel.py``), the C++ kernel
  on CPU tensors (``cpu_kernel.py``), or plain tensor ops (no unfold) elsewhere or when those
  cannot be built.
* Memory format: channels_last in, channels_last out. The C++ kernels, the CUDA kernels and the
  pure-PyTorch path all run NCHW and NHWC natively: each result is computed in the layout of the
  feature map it comes from (:func:`_layout`; NHWC weights are the channels_last kernel-generator
  output, memory order (n, i, j, g, u, v)), and nothing is copied.
* Fused kernel generation (:func:`involution_fused`): one more custom op pair,
  ``involution_fused`` / ``involution_fused_backward``, takes the kernel generator's reduced
  features and its last 1x1 convolution instead of the generated weights; the C++ and CUDA kernels
  generate the weights inside the aggregation and never store them. Devices without a fused kernel
  compute the same inside the op with the unfused kernels; the generated weights are then not kept
  for backward either (the backward regenerates them).
* Autocast (CUDA and CPU): both inputs are cast to the autocast dtype and the kernel runs in it
  (accumulating in fp32); there is no silent fall-back to an fp32 op.
* ``torch.jit.trace`` records the custom op as one node (fvcore's ``FlopCountAnalysis`` counts it
  through ``d2_involution.ops.flops``; the traced module runs wherever ``d2_involution`` is
  imported). ONNX export, and tracing inside :func:`pure_pytorch_trace`, record
  :func:`involution_pytorch` instead, i.e. only standard operators.
"""

import contextlib
import warnings
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import cpu_kernel, cuda_kernel
from .shapes import (
    SUPPORTED_DTYPES,
    check_forward,
    check_fused,
    check_fused_backward,
    check_grad_input,
    check_grad_weight,
    dims,
    involution_output_size,
)

__all__ = [
    "generate_weights",
    "has_fused_kernel",
    "involution",
    "involution_fused",
    "involution_output_size",
    "involution_pytorch",
    "pure_pytorch_trace",
    "SUPPORTED_DTYPES",
]

_AUTOCAST_DEVICES = ("cuda", "cpu")
_pure_trace_depth = 0


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


def _check_int(name: str, value, op: str = "involution") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__} ({value!r})")
    return value


def _check_tensor_types(op: str, tensors: Dict[str, Tensor]) -> None:
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _resolve_geometry(
    op: str, kernel_size: int, stride: int, padding: Optional[int], dilation: int
) -> Tuple[int, int, int]:
    """stride, padding and dilation as ints; padding=None made the "same" padding."""
    stride, dilation = _check_int("stride", stride, op), _check_int("dilation", dilation, op)
    if padding is None:
        padding = dilation * (kernel_size - 1) // 2
    return stride, _check_int("padding", padding, op), dilation


def _resolve_args(
    x: Tensor, weight: Tensor, stride: int, padding: Optional[int], dilation: int
) -> Tuple[int, int, int]:
    """The Python-level arguments: tensors, ints, and padding=None made the "same" padding.

    Shapes, dtypes and devices are checked once, by the op itself (``shapes.check_forward``).
    """
    _check_tensor_types("involution", {"x": x, "weight": weight})
    # A weight that is not 6-D is reported by the op's shape check.
    K = dims(weight)[2] if weight.dim() == 6 else 1
    return _resolve_geometry("involution", K, stride, padding, dilation)


def _layout(t: Tensor) -> str:
    """The layout of the kernels' results computed from feature map t (see the module doc): the
    same on every device, since every kernel set runs NCHW and NHWC natively."""
    return cpu_kernel.layout(t)


def _as_map_of(t: Tensor, like: Tensor) -> Tensor:
    """t dense in the layout the kernels use for feature map ``like`` (a copy only if needed)."""
    return t.contiguous(memory_format=cpu_kernel.memory_format(_layout(like)))


def _as_weight_of(gw: Tensor, like: Tensor) -> Tensor:
    lay = _layout(like)
    return gw if lay == "nchw" else cpu_kernel.empty_weight(gw.shape, lay, gw).copy_(gw)


def _in_format_of(out: Tensor, x: Tensor) -> Tensor:
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def involution(
    x: Tensor,
    weight: Tensor,
    stride: int = 1,
    padding: Optional[int] = None,
    dilation: int = 1,
) -> Tensor:
    """Apply involution. x: (N, C, H, W); weight: (N, G, K, K, Ho, Wo). Returns (N, C, Ho, Wo).

    Differentiable in both inputs. Runs the CUDA kernels on CUDA tensors and the C++ kernel on CPU
    tensors; see the module docstring for compile, autocast, tracing, export and memory format.
    """
    stride, padding, dilation = _resolve_args(x, weight, stride, padding, dilation)
    if _record_pure_path():
        return involution_pytorch(x, weight, stride, padding, dilation)
    out = torch.ops.d2_involution.involution(x, weight, stride, padding, dilation)
    return _in_format_of(out, x)


def involution_pytorch(
    x: Tensor, weight: Tensor, stride: int = 1, padding: Optional[int] = None, dilation: int = 1
) -> Tensor:
    """Involution with standard tensor ops only (traceable, exportable, differentiable by autograd).

    Low-precision inputs are accumulated in fp32.
    """
    stride, padding, dilation = _resolve_args(x, weight, stride, padding, dilation)
    check_forward(x, weight, stride, padding, dilation)
    return _pytorch_forward(x, weight, stride, padding, dilation)


# ---------------------------------------------------------------------------------------------
# Pure-PyTorch kernels: K*K strided views of the padded input, accumulated in place of an unfold.
# Peak extra memory: the padded input plus one output-sized product.


def _shifted_views(xp: Tensor, K: int, Ho: int, Wo: int, stride: int, dilation: int):
    """Yields (u, v, view of the padded xp under tap (u, v)), each view of shape (..., Ho, Wo)."""
    for u in range(K):
        for v in range(K):
            hs, ws = u * dilation, v * dilation
            he, we = hs + (Ho - 1) * stride + 1, ws + (Wo - 1) * stride + 1
            yield u, v, xp[..., hs:he:stride, ws:we:stride]


def _pytorch_forward(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
    # Batch, channel and spatial sizes as the tensors give them (traced sizes under tracing, so
    # an exported graph takes any input size); only G and K are fixed by the module.
    N, C, H, W = x.shape
    G, K = dims(weight)[1:3]
    Ho, Wo = weight.shape[4:]
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
# Kernel sets per device. fp16/bf16 on the CPU run the fp32 C++ kernel (fp32 accumulation).


class _Kernels(NamedTuple):
    """The three kernels of one implementation, with the custom ops' signatures."""

    forward: Callable[..., Tensor]
    grad_input: Callable[..., Tensor]
    grad_weight: Callable[..., Tensor]


def _on_cpu_kernel(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn`` of cpu_kernel on fp32/fp64 tensors, its result(s) cast back to the inputs' dtype."""

    def run(*args):
        dtype = args[0].dtype
        kdt = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        out = fn(*(a.to(kdt) if isinstance(a, Tensor) else a for a in args))
        return out.to(dtype) if isinstance(out, Tensor) else tuple(t.to(dtype) for t in out)

    return run


def _pytorch_forward_kernel(x: Tensor, weight: Tensor, *geometry: int) -> Tensor:
    return _as_map_of(_pytorch_forward(x, weight, *geometry), x)


def _pytorch_grad_input_kernel(grad_out: Tensor, weight: Tensor, *args: int) -> Tensor:
    return _as_map_of(_pytorch_grad_input(grad_out, weight, *args), grad_out)


def _pytorch_grad_weight_kernel(grad_out: Tensor, x: Tensor, *args: int) -> Tensor:
    return _as_weight_of(_pytorch_grad_weight(grad_out, x, *args), x)


# The pure-PyTorch kernels, results in the layouts of the C++ kernels (the fake kernels' layouts).
_PYTORCH = _Kernels(
    _pytorch_forward_kernel, _pytorch_grad_input_kernel, _pytorch_grad_weight_kernel
)
_CPU = _Kernels(
    _on_cpu_kernel(cpu_kernel.forward),
    _on_cpu_kernel(cpu_kernel.grad_input),
    _on_cpu_kernel(cpu_kernel.grad_weight),
)
_warned_no_cuda_kernels = False


def _cuda_kernels() -> _Kernels:
    """The CuPy kernels when they can run; else warns once and returns the pure-PyTorch set."""
    global _warned_no_cuda_kernels
    if cuda_kernel.available():
        return _Kernels(cuda_kernel.forward, cuda_kernel.grad_input, cuda_kernel.grad_weight)
    if not _warned_no_cuda_kernels:
        _warned_no_cuda_kernels = True
        warnings.warn(
            "d2_involution: the CUDA involution kernels are unavailable "
            f"({cuda_kernel.unavailable_reason()}); using the slower pure-PyTorch path. "
            "Install CuPy for your CUDA version (e.g. pip install cupy-cuda12x).",
            RuntimeWarning,
            stacklevel=3,
        )
    return _PYTORCH


def _kernels(device: torch.device) -> _Kernels:
    if device.type == "cuda":
        return _cuda_kernels()
    if device.type == "cpu" and cpu_kernel.available():
        return _CPU
    return _PYTORCH


# ---------------------------------------------------------------------------------------------
# The custom ops: one body each for every device; the shape check is the only validation.


@torch.library.custom_op("d2_involution::involution", mutates_args=())
def _involution_op(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
    check_forward(x, weight, stride, padding, dilation)
    return _kernels(x.device).forward(x, weight, stride, padding, dilation)


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
    args = (grad_out, weight, height, width, stride, padding, dilation)
    check_grad_input(*args)
    return _kernels(grad_out.device).grad_input(*args)


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
    args = (grad_out, x, groups, kernel_size, stride, padding, dilation)
    check_grad_weight(*args)
    return _kernels(grad_out.device).grad_weight(*args)


@_involution_op.register_fake
def _involution_fake(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
    check_forward(x, weight, stride, padding, dilation)
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
    check_grad_input(grad_out, weight, height, width, stride, padding, dilation)
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
    check_grad_weight(grad_out, x, groups, kernel_size, stride, padding, dilation)
    N, _, Ho, Wo = grad_out.shape
    shape = (N, groups, kernel_size, kernel_size, Ho, Wo)
    return cpu_kernel.empty_weight(shape, _layout(x), grad_out)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (stride, padding, dilation)


def _backward(ctx, grad_out: Tensor):
    x, weight = ctx.saved_tensors
    grad_out = _as_map_of(grad_out, x)  # once for both kernels
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
# reduced, reshaped to (N, G, K, K, Ho, Wo).


def generate_weights(
    reduced: Tensor, gen_weight: Tensor, gen_bias: Tensor, kernel_size: int
) -> Tensor:
    """The (N, G, K, K, Ho, Wo) weights the fused op generates: a 1x1 convolution of reduced."""
    M, R = gen_weight.shape[0], reduced.shape[1]
    w = torch.nn.functional.conv2d(reduced, gen_weight.reshape(M, R, 1, 1), gen_bias)
    N, _, Ho, Wo = w.shape
    # A view, channels_last included (only the channel dim is split).
    return w.view(N, M // (kernel_size * kernel_size), kernel_size, kernel_size, Ho, Wo)


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
    differentiable in all four tensors, without keeping the generated weights: on CPU tensors the
    C++ kernels generate them inside the aggregation; on devices without a fused kernel (CUDA for
    now) the op generates them, runs the unfused kernels and regenerates them in backward. ONNX
    export and :func:`pure_pytorch_trace` record that unfused computation in standard operators.
    """
    op = "involution_fused"
    tensors = {"x": x, "reduced": reduced, "gen_weight": gen_weight, "gen_bias": gen_bias}
    _check_tensor_types(op, tensors)
    K = _check_int("kernel_size", kernel_size, op)
    stride, padding, dilation = _resolve_geometry(op, K, stride, padding, dilation)
    if _record_pure_path():
        check_fused(x, reduced, gen_weight, gen_bias, K, stride, padding, dilation)
        weight = generate_weights(reduced, gen_weight, gen_bias, K)
        return _pytorch_forward(x, weight, stride, padding, dilation)
    out = torch.ops.d2_involution.involution_fused(
        x, reduced, gen_weight, gen_bias, K, stride, padding, dilation
    )
    return _in_format_of(out, x)


class _FusedKernels(NamedTuple):
    """Fused kernel generation on one device, with the signatures of the CUDA host functions:
    ``forward(x, reduced, gen_weight, gen_bias, stride, padding, dilation, kernel_size, groups)``
    -> out, ``backward(grad_out, <the same>)`` -> (grad_x, grad_reduced, grad_gen_weight,
    grad_gen_bias)."""

    forward: Callable[..., Tensor]
    backward: Callable[..., Tuple[Tensor, Tensor, Tensor, Tensor]]


def _unfused_forward(x, reduced, gen_weight, gen_bias, stride, padding, dilation, K, groups):
    weight = generate_weights(reduced, gen_weight, gen_bias, K)
    return _kernels(x.device).forward(x, weight, stride, padding, dilation)


def _unfused_backward(grad_out, x, reduced, gen_weight, gen_bias, stride, padding, dilation, K, G):
    """The fused op's gradients through the unfused kernels, the weights regenerated."""
    kernels, geometry = _kernels(x.device), (stride, padding, dilation)
    weight = generate_weights(reduced, gen_weight, gen_bias, K)
    N, _, _, _, Ho, Wo = weight.shape
    M, R = G * K * K, reduced.shape[1]
    gx = kernels.grad_input(grad_out, weight, x.shape[2], x.shape[3], *geometry)
    gw = kernels.grad_weight(grad_out, x, G, K, *geometry).reshape(N, M, Ho, Wo)
    acc = torch.promote_types(gw.dtype, torch.float32)
    gw, red, A = gw.to(acc), reduced.to(acc), gen_weight.reshape(M, R).to(acc)
    gred = torch.einsum("nmij,mr->nrij", gw, A)
    gA = torch.einsum("nmij,nrij->mr", gw, red).reshape(gen_weight.shape)
    return gx, gred, gA, gw.sum((0, 2, 3))


_UNFUSED = _FusedKernels(_unfused_forward, _unfused_backward)
_CPU_FUSED = _FusedKernels(
    _on_cpu_kernel(cpu_kernel.fused_forward), _on_cpu_kernel(cpu_kernel.fused_backward)
)


def _cuda_fused_kernels() -> _FusedKernels:
    """``cuda_kernel.fused_forward`` / ``fused_backward`` where cuda_kernel has them and can run;
    else the unfused composition (with the unfused CUDA kernels)."""
    from . import cuda_kernel

    forward = getattr(cuda_kernel, "fused_forward", None)
    if forward is None or not cuda_kernel.available():
        return _UNFUSED
    return _FusedKernels(forward, cuda_kernel.fused_backward)


def _fused_kernels(device: torch.device) -> _FusedKernels:
    if device.type == "cuda":
        return _cuda_fused_kernels()
    if device.type == "cpu" and cpu_kernel.available():
        return _CPU_FUSED
    return _UNFUSED


def has_fused_kernel(device: torch.device) -> bool:
    """Whether ``involution_fused`` runs a fused kernel on ``device`` (not the unfused kernels)."""
    return _fused_kernels(torch.device(device)) is not _UNFUSED


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
    G, _, _ = check_fused(x, reduced, gen_weight, gen_bias, kernel_size, stride, padding, dilation)
    args = (x, reduced, gen_weight, gen_bias, stride, padding, dilation, kernel_size, G)
    return _as_map_of(_fused_kernels(x.device).forward(*args), x)


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
    inputs = (x, reduced, gen_weight, gen_bias)
    check_fused_backward(grad_out, *inputs, kernel_size, stride, padding, dilation)
    G = gen_weight.shape[0] // (kernel_size * kernel_size)
    geometry = (stride, padding, dilation, kernel_size, G)
    gx, gred, gA, gb = _fused_kernels(x.device).backward(grad_out, *inputs, *geometry)
    return [_as_map_of(gx, x), _as_map_of(gred, x), gA.contiguous(), gb.contiguous()]


@_fused_op.register_fake
def _fused_fake(x, reduced, gen_weight, gen_bias, kernel_size, stride, padding, dilation):
    check_fused(x, reduced, gen_weight, gen_bias, kernel_size, stride, padding, dilation)
    N, C = x.shape[:2]
    return _as_map_of(x.new_empty((N, C, reduced.shape[2], reduced.shape[3])), x)


@_fused_backward_op.register_fake
def _fused_backward_fake(grad_out, x, reduced, gen_weight, gen_bias, *geometry):
    check_fused_backward(grad_out, x, reduced, gen_weight, gen_bias, *geometry)
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
    x = ctx.saved_tensors[0]
    grads = _fused_backward_op(_as_map_of(grad_out, x), *ctx.saved_tensors, *ctx.geometry)
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
