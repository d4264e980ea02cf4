"""fp16/bf16 and autocast gradients against float64, at op and layer level (CPU; CUDA marked).

Errors are relative, in norm: ``|a - ref| / |ref|`` over the whole tensor. Tolerances follow the
formats' rounding (unit roundoff 2**-8 for bf16, 2**-11 for fp16) times a small factor for the
K*K-term sums, accumulated in fp32 by the kernels:

* op, inputs in the low-precision dtype: bf16 1.5e-2, fp16 2e-3 (forward and both gradients);
* op and layer under autocast (fp32 parameters and inputs): bf16 3e-2, fp16 4e-3.
"""

import pytest
import torch
from involution_reference import reference

from d2_involution.layers import Involution
from d2_involution.ops import involution

OP_TOL = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3}
AUTOCAST_TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}
CPU_DTYPES = [torch.bfloat16, torch.float16]


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).norm() / ref.norm())


def _op_inputs(device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 13, 11, generator=g, dtype=torch.float64)
    w = torch.randn(2, 2, 7, 7, 7, 6, generator=g, dtype=torch.float64)  # stride 2, K 7
    grad_out = torch.randn(2, 32, 7, 6, generator=g, dtype=torch.float64)
    return x.to(device), w.to(device), grad_out.to(device)


def _forward_and_grads(fn, x, w, grad_out, **kwargs):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fn(x, w, stride=2, **kwargs)
    gx, gw = torch.autograd.grad(y, (x, w), grad_out.to(y.dtype))
    return y, gx, gw


def _check_op_in_dtype(dtype: torch.dtype, device: str) -> None:
    x, w, grad_out = _op_inputs(device)
    want = _forward_and_grads(reference, x, w, grad_out)
    got = _forward_and_grads(involution, x.to(dtype), w.to(dtype), grad_out.to(dtype))
    for name, a, ref in zip(("forward", "grad_input", "grad_weight"), got, want):
        assert a.dtype == dtype, name
        assert relative_error(a, ref) < OP_TOL[dtype], (name, relative_error(a, ref))
        assert relative_error(a, ref) > 0, name  # really computed in low precision


def _check_op_under_autocast(dtype: torch.dtype, device: str) -> None:
    x, w, grad_out = _op_inputs(device)
    want = _forward_and_grads(reference, x, w, grad_out)
    with torch.autocast(device, dtype=dtype):
        got = _forward_and_grads(involution, x.float(), w.float(), grad_out)
    assert got[0].dtype == dtype and got[1].dtype == got[2].dtype == torch.float32
    for name, a, ref in zip(("forward", "grad_input", "grad_weight"), got, want):
        assert relative_error(a, ref) < AUTOCAST_TOL[dtype], (name, relative_error(a, ref))


def _check_layer_under_autocast(dtype: torch.dtype, device: str) -> None:
    torch.manual_seed(0)
    layer = Involution(64, 7, stride=2, norm="BN").to(device).eval()
    x = torch.randn(2, 64, 15, 17, device=device)
    grads = []
    for enabled in (False, True):
        layer.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            y = layer(xr)
        (y.float() * torch.linspace(-1, 1, y.numel(), device=device).view(y.shape)).sum().backward()
        grads.append({"input": xr.grad, **{n: p.grad for n, p in layer.named_parameters()}})
    fp32, low = grads
    assert len(fp32) == 6
    for name, ref in fp32.items():
        assert relative_error(low[name], ref) < AUTOCAST_TOL[dtype] * 2, (name, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_op_in_low_precision_cpu(dtype):
    _check_op_in_dtype(dtype, "cpu")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_op_under_autocast_cpu(dtype):
    _check_op_under_autocast(dtype, "cpu")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_layer_under_autocast_cpu(dtype):
    _check_layer_under_autocast(dtype, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(
    "check", [_check_op_in_dtype, _check_op_under_autocast, _check_layer_under_autocast]
)
def test_low_precision_cuda(check, dtype):
    check(dtype, "cuda")
