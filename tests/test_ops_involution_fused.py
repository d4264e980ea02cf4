"""The fused op ``involution_fused``: against the unfused computation (forward and the gradients of
x, reduced, gen_weight and gen_bias) in both layouts, gradcheck, opcheck, threads, the fallback
paths, autocast, and bad input."""

import random

import pytest
import torch

import d2_involution  # noqa: F401  # isort: skip
from involution_reference import reference  # noqa: E402  (tests/ is on sys.path)

from d2_involution.ops import cpu_kernel, generate_weights, involution_fused, involution_output_size

OP = torch.ops.d2_involution


def random_config(rng: random.Random) -> dict:
    K = rng.choice([1, 3, 5, 7])
    stride = rng.choice([1, 2, 3])
    dilation = rng.choice([1, 2])
    padding = rng.choice([None, rng.randint(0, dilation * (K - 1) // 2 + 1)])
    p = dilation * (K - 1) // 2 if padding is None else padding
    min_size = max(1, dilation * (K - 1) + 1 - 2 * p)
    G = rng.choice([1, 2, 3])
    return dict(
        N=rng.randint(1, 3),
        C=G * rng.choice([1, 3, 4, 8, 16]),
        G=G,
        R=rng.choice([1, 3, 8, 13]),
        H=rng.randint(min_size, min_size + 12),
        W=rng.randint(min_size, min_size + 12),
        K=K,
        stride=stride,
        padding=padding,
        dilation=dilation,
    )


CONFIGS = [random_config(random.Random(seed)) for seed in range(24)]


def make_inputs(cfg: dict, dtype=torch.float64, layout: str = "nchw", seed: int = 0):
    """x, reduced, gen_weight (K*K*G, R, 1, 1 as a conv weight), gen_bias; leaves."""
    g = torch.Generator().manual_seed(seed)
    K, G, R = cfg["K"], cfg["G"], cfg["R"]
    geometry = (cfg["K"], cfg["stride"], cfg["padding"], cfg["dilation"])
    Ho = involution_output_size(cfg["H"], *geometry)
    Wo = involution_output_size(cfg["W"], *geometry)
    x = torch.randn(cfg["N"], cfg["C"], cfg["H"], cfg["W"], generator=g, dtype=torch.float64)
    red = torch.randn(cfg["N"], R, Ho, Wo, generator=g, dtype=torch.float64)
    A = torch.randn(K * K * G, R, 1, 1, generator=g, dtype=torch.float64) / R**0.5
    b = torch.randn(K * K * G, generator=g, dtype=torch.float64)
    if layout == "nhwc":
        x, red = (t.contiguous(memory_format=torch.channels_last) for t in (x, red))
    return [t.to(dtype).requires_grad_() for t in (x, red, A, b)]


def kwargs_of(cfg: dict) -> dict:
    return dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"])


def unfused(x, red, A, b, cfg):
    """The reference: generated weights, then the float64 unfold involution."""
    return reference(x, generate_weights(red, A, b, cfg["K"]), **kwargs_of(cfg))


def assert_fused_matches(cfg, layout, dtype=torch.float64, tol=1e-10):
    inputs = make_inputs(cfg, dtype, layout)
    out = involution_fused(*inputs, cfg["K"], **kwargs_of(cfg))
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = unfused(*ref_inputs, cfg)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol, msg=lambda m: f"{cfg}: {m}")
    grad = torch.randn(ref.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, grad.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad)
    for name, a, r in zip(("x", "reduced", "gen_weight", "gen_bias"), grads, ref_grads):
        assert a.shape == r.shape, name
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(
            a.double(), r, rtol=tol, atol=tol * scale, msg=lambda m: f"{cfg} grad {name}: {m}"
        )
    return out, grads


def require_kernel() -> None:
    if not cpu_kernel.available():
        pytest.skip(f"C++ CPU kernel unavailable: {cpu_kernel.unavailable_reason()}")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"cfg{i}" for i in range(len(CONFIGS))])
def test_fused_matches_unfused_float64(layout, cfg):
    require_kernel()
    out, grads = assert_fused_matches(cfg, layout)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    if cfg["C"] > 1 and out.shape[2] * out.shape[3] > 1:
        assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_fused_float32(layout):
    require_kernel()
    cfg = dict(N=2, C=64, G=4, R=16, H=15, W=17, K=7, stride=2, padding=None, dilation=1)
    assert_fused_matches(cfg, layout, torch.float32, tol=1e-4)


@pytest.mark.parametrize("cfg", CONFIGS[:6], ids=[f"cfg{i}" for i in range(6)])
def test_fused_fallback_without_kernel(cfg, monkeypatch):
    """Without the C++ kernel the fused op computes the unfused path (same results)."""
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    assert_fused_matches(cfg, "nchw")


def test_fused_gradcheck_float64():
    require_kernel()
    cfg = dict(N=2, C=4, G=2, R=3, H=6, W=5, K=3, stride=2, padding=1, dilation=2)
    inputs = make_inputs(cfg)
    assert torch.autograd.gradcheck(
        lambda *t: involution_fused(*t, cfg["K"], **kwargs_of(cfg)), inputs
    )


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_fused_opcheck(layout):
    cfg = dict(N=2, C=12, G=3, R=5, H=7, W=8, K=3, stride=2, padding=2, dilation=2)
    x, red, A, b = make_inputs(cfg, layout=layout)
    torch.library.opcheck(OP.involution_fused.default, (x, red, A, b, 3, 2, 2, 2))
    go = torch.randn(2, 12, red.shape[2], red.shape[3], dtype=torch.float64)
    if layout == "nhwc":
        go = go.contiguous(memory_format=torch.channels_last)
    args = (go, x.detach(), red.detach(), A.detach(), b.detach(), 3, 2, 2, 2)
    torch.library.opcheck(OP.involution_fused_backward.default, args)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_fused_threads_do_not_change_results(layout):
    require_kernel()
    cfg = dict(N=3, C=32, G=2, R=8, H=11, W=13, K=5, stride=2, padding=None, dilation=1)
    inputs = make_inputs(cfg, torch.float32, layout)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = involution_fused(*inputs, 5, stride=2)
            results.append((out, *torch.autograd.grad(out.square().sum(), inputs)))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_fused_accepts_2d_gen_weight():
    require_kernel()
    cfg = dict(N=1, C=8, G=2, R=4, H=6, W=6, K=3, stride=1, padding=None, dilation=1)
    x, red, A, b = make_inputs(cfg)
    A2 = A.detach().reshape(18, 4).requires_grad_()
    out = involution_fused(x, red, A2, b, 3)
    torch.testing.assert_close(out, involution_fused(x, red, A, b, 3))
    (gA,) = torch.autograd.grad(out.sum(), (A2,))
    assert gA.shape == (18, 4)


def test_cuda_fused_kernel_plugs_in(monkeypatch):
    """On CUDA the fused op runs ``cuda_kernel.fused_forward`` / ``fused_backward`` once
    cuda_kernel has them (and can run), else the unfused kernels inside the op."""
    from d2_involution.ops import cuda_kernel, has_fused_kernel

    monkeypatch.setattr(cuda_kernel, "available", lambda: True)
    monkeypatch.delattr(cuda_kernel, "fused_forward", raising=False)
    assert not has_fused_kernel("cuda")
    monkeypatch.setattr(cuda_kernel, "fused_forward", lambda *args: None, raising=False)
    monkeypatch.setattr(cuda_kernel, "fused_backward", lambda *args: None, raising=False)
    assert has_fused_kernel("cuda")
    monkeypatch.setattr(cuda_kernel, "available", lambda: False)
    assert not has_fused_kernel("cuda")


def test_fused_meta_tensors_and_raw_op_checks():
    """The fake kernel gives the output shape (meta tensors); the raw ops check their inputs."""
    cfg = dict(N=2, C=8, G=2, R=4, H=6, W=7, K=3, stride=2, padding=None, dilation=1)
    x, red, A, b = (t.detach() for t in make_inputs(cfg))
    meta = [t.to("meta") for t in (x, red, A, b)]
    assert involution_fused(*meta, 3, stride=2).shape == (2, 8, 3, 4)
    with pytest.raises(ValueError, match=r"reduced spatial size \(3, 4\)"):
        OP.involution_fused(x, red, A, b, 3, 1, 1, 1)
    go = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"grad_out must have the forward output's shape"):
        OP.involution_fused_backward(go, x, red, A, b, 3, 2, 1, 1)


def test_fused_autocast_runs_in_autocast_dtype():
    cfg = dict(N=2, C=8, G=2, R=4, H=7, W=7, K=3, stride=1, padding=None, dilation=1)
    x, red, A, b = make_inputs(cfg, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = involution_fused(x, red, A, b, 3)
    assert out.dtype == torch.bfloat16
    ref = unfused(*(t.detach().bfloat16() for t in (x, red, A, b)), cfg)
    torch.testing.assert_close(out.double(), ref, rtol=0.02, atol=0.02 * ref.abs().max().item())
    grads = torch.autograd.grad(out.float().sum(), (x, red, A, b))
    assert all(g.dtype == torch.float32 for g in grads)


def _fused_bad(**changes):
    cfg = dict(N=2, C=8, G=2, R=4, H=6, W=6, K=3, stride=1, padding=None, dilation=1)
    x, red, A, b = (t.detach() for t in make_inputs(cfg, torch.float32))
    args = dict(x=x, reduced=red, gen_weight=A, gen_bias=b, kernel_size=3)
    args.update(changes)
    return args


BAD_FUSED = [
    (_fused_bad(x=torch.randn(2, 8, 6)), ValueError, r"x must be 4-D"),
    (_fused_bad(reduced=torch.randn(2, 4, 6)), ValueError, r"reduced must be 4-D"),
    (_fused_bad(kernel_size=4), ValueError, r"kernel_size must be a positive odd int, got 4"),
    (_fused_bad(gen_weight=torch.randn(18, 5)), ValueError, r"gen_weight must be .*R=4"),
    (_fused_bad(gen_weight=torch.randn(17, 4)), ValueError, r"gen_weight must be .*\(17, 4\)"),
    (_fused_bad(gen_bias=torch.randn(17)), ValueError, r"gen_bias must have shape \(18,\)"),
    (
        _fused_bad(gen_weight=torch.randn(27, 4), gen_bias=torch.randn(27)),
        ValueError,
        r"divisible by the groups of gen_weight \(3 = 27 / K\^2",
    ),
    (_fused_bad(reduced=torch.randn(3, 4, 6, 6)), ValueError, r"batch size of reduced \(3"),
    (_fused_bad(reduced=torch.randn(2, 4, 5, 6)), ValueError, r"reduced spatial size \(5, 6\)"),
    (
        _fused_bad(gen_bias=torch.randn(18, dtype=torch.float64)),
        TypeError,
        r"x torch.float32 and gen_bias torch.float64",
    ),
]


@pytest.mark.parametrize("args,exc,match", BAD_FUSED)
def test_fused_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        involution_fused(**args)
