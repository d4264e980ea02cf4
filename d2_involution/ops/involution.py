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
* Memory format: on CUDA the kernels read NCHW and NHWC natively (``cuda_kernel.layout_of``:
  channels_last x selects NHWC, the weight then being the channels_last kernel-generator output),
  and every op's result comes in its input's layout (the fakes say the same). The CPU kernels work
  on NCHW: :func:`involution` passes them contiguous copies (kept for backward, so nothing is
  copied twice). Either way the output has the memory format of ``x``.
* Autocast (CUDA and CPU): both inputs are cast to the autocast dtype and the kernel runs in it
  (accumulating in fp32); there is no silent fall-back to an fp32 op.
* ``torch.jit.trace`` records the custom op as one node (fvcore's ``FlopCountAnalysis`` counts it
  through ``d2_involution.ops.flops``; the traced module runs wherever ``d2_involution`` is
  imported). ONNX export, and tracing inside :func:`pure_pytorch_trace`, record
  :func:`involution_pytorch` instead, i.e. only standard operators.
"""

import contextlib
import warnings
from typing import Callable, Iterator, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import cpu_kernel, cuda_kernel
from .shapes import (
    SUPPORTED_DTYPES,
    check_forward,
    check_grad_input,
    check_grad_weight,
    dims,
    involution_output_size,
)

__all__ = [
    "involution",
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


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"involution: {name} must be an int, got {type(value).__name__} ({value!r})"
        )
    return value


def _resolve_args(
    x: Tensor, weight: Tensor, stride: int, padding: Optional[int], dilation: int
) -> Tuple[int, int, int]:
    """The Python-level arguments: tensors, ints, and padding=None made the "same" padding.

    Shapes, dtypes and devices are checked once, by the op itself (``shapes.check_forward``).
    """
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"involution: {name} must be a torch.Tensor, got {type(t).__name__}")
    stride, dilation = _check_int("stride", stride), _check_int("dilation", dilation)
    if padding is None:
        # The "same" padding; a weight that is not 6-D is reported by the op's shape check.
        padding = dilation * (dims(weight)[2] - 1) // 2 if weight.dim() == 6 else 0
    return stride, _check_int("padding", padding), dilation


def _is_channels_last(x: Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


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
    if x.is_cuda:  # native NCHW / NHWC kernels, output in x's layout
        return torch.ops.d2_involution.involution(x, weight, stride, padding, dilation)
    out = torch.ops.d2_involution.involution(
        x.contiguous(), weight.contiguous(), stride, padding, dilation
    )
    return out.contiguous(memory_format=torch.channels_last) if _is_channels_last(x) else out


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
    N, C, H, W = dims(x)
    _, G, K, _, Ho, Wo = dims(weight)
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
    """``fn`` of cpu_kernel on contiguous fp32/fp64 copies, the result cast back."""

    def run(a: Tensor, b: Tensor, *args: int) -> Tensor:
        kdt = a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32
        return fn(a.to(kdt).contiguous(), b.to(kdt).contiguous(), *args).to(a.dtype)

    return run


_PYTORCH = _Kernels(_pytorch_forward, _pytorch_grad_input, _pytorch_grad_weight)
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


def _layout(t: Tensor) -> str:
    """The layout an op's result takes from its input t: the CUDA kernels' (NHWC for channels_last),
    NCHW on other devices."""
    return cuda_kernel.layout_of(t) if t.is_cuda else "nchw"


# ---------------------------------------------------------------------------------------------
# The custom ops: one body each for every device; the shape check is the only validation.


@torch.library.custom_op("d2_involution::involution", mutates_args=())
def _involution_op(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
    check_forward(x, weight, stride, padding, dilation)
    out = _kernels(x.device).forward(x, weight, stride, padding, dilation)
    return cuda_kernel.as_layout(out, _layout(x))


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
    return cuda_kernel.as_layout(_kernels(grad_out.device).grad_input(*args), _layout(grad_out))


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
    gw = _kernels(grad_out.device).grad_weight(*args)
    return cuda_kernel.weight_as_layout(gw, _layout(x))


@_involution_op.register_fake
def _involution_fake(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
    check_forward(x, weight, stride, padding, dilation)
    out = x.new_empty((x.shape[0], x.shape[1], weight.shape[4], weight.shape[5]))
    return cuda_kernel.as_layout(out, _layout(x))


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
    return cuda_kernel.as_layout(gx, _layout(grad_out))


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
    gw = grad_out.new_empty((N, groups, kernel_size, kernel_size, Ho, Wo))
    return cuda_kernel.weight_as_layout(gw, _layout(x))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (stride, padding, dilation)


def _backward(ctx, grad_out: Tensor):
    x, weight = ctx.saved_tensors
    grad_out = cuda_kernel.as_layout(grad_out, _layout(x))  # once for both kernels
    grad_x = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_x = _grad_input_op(grad_out, weight, x.shape[2], x.shape[3], *ctx.geometry)
    if ctx.needs_input_grad[1]:
        grad_weight = _grad_weight_op(grad_out, x, weight.shape[1], weight.shape[2], *ctx.geometry)
    return grad_x, grad_weight, None, None, None


_involution_op.register_autograd(_backward, setup_context=_setup_context)


def _register_autocast(device_type: str) -> None:
    """Under autocast, cast both inputs to the autocast dtype (not a fixed one) and run the op."""
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)
    op = torch.ops.d2_involution.involution.default

    def cast(t: Tensor) -> Tensor:
        dtype = torch.get_autocast_dtype(device_type)
        return t.to(dtype) if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t

    def run(x, weight, stride, padding, dilation):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(cast(x), cast(weight), stride, padding, dilation)

    op.py_impl(key)(run)
    _LIB.impl("involution", lambda _keyset, *args: run(*args), key_name, with_keyset=True)


_LIB = torch.library.Library("d2_involution", "IMPL")
for _device in _AUTOCAST_DEVICES:
    _register_autocast(_device)
