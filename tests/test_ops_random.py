"""1200 seeded random involution configurations in float64: forward and both gradients.

Every configuration (batch, groups, channels per group, odd and even sizes down to 1, kernel
1..7, stride 1..3, dilation 1..3, padding from 0 to more than "same", channels_last inputs) is
checked through the public ``involution`` op (the C++ CPU kernel, or CUDA on a GPU) and, the
first 200, through ``involution_pytorch``, against the float64 unfold reference of
tests/involution_reference.py and its autograd gradients. Small sizes keep the file cheap.
"""

import random

import pytest
import torch
from involution_reference import reference

from d2_involution.ops import involution, involution_output_size, involution_pytorch

NUM_CONFIGS = 1200
CHUNKS = 6


def random_config(rng: random.Random) -> dict:
    """One valid configuration (output at least 1x1)."""
    while True:
        K = rng.choice([1, 3, 3, 5, 7])
        stride, dilation = rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2, 3])
        same = dilation * (K - 1) // 2
        padding = rng.choice([same, same, 0, rng.randint(0, same + 2)])
        H, W = rng.randint(1, 11), rng.randint(1, 11)
        Ho, Wo = (involution_output_size(s, K, stride, padding, dilation) for s in (H, W))
        if Ho >= 1 and Wo >= 1:
            break
    G, per_group = rng.randint(1, 3), rng.choice([1, 2, 4])
    return dict(
        N=rng.randint(1, 2),
        G=G,
        C=G * per_group,
        H=H,
        W=W,
        K=K,
        Ho=Ho,
        Wo=Wo,
        stride=stride,
        padding=padding,
        dilation=dilation,
        channels_last=rng.random() < 0.2,
    )


def _inputs(cfg: dict, seed: int, device: str):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg["N"], cfg["C"], cfg["H"], cfg["W"], generator=g, dtype=torch.float64)
    shape = (cfg["N"], cfg["G"], cfg["K"], cfg["K"], cfg["Ho"], cfg["Wo"])
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    grad_out = torch.randn(
        cfg["N"], cfg["C"], cfg["Ho"], cfg["Wo"], generator=g, dtype=torch.float64
    )
    if cfg["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    return (t.to(device) for t in (x, w, grad_out))


def _check(op, cfg: dict, seed: int, device: str) -> None:
    x, w, grad_out = _inputs(cfg, seed, device)
    args = (cfg["stride"], cfg["padding"], cfg["dilation"])
    outs = []
    for fn in (op, reference):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xr, wr, *args)
        outs.append((y, *torch.autograd.grad(y, (xr, wr), grad_out)))
    for name, got, want in zip(("forward", "grad_input", "grad_weight"), *outs):
        torch.testing.assert_close(
            got, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name} {cfg}: {m}"
        )


def _run_chunk(op, chunk: int, device: str) -> int:
    per_chunk = NUM_CONFIGS // CHUNKS
    for seed in range(chunk * per_chunk, (chunk + 1) * per_chunk):
        _check(op, random_config(random.Random(seed)), seed, device)
    return per_chunk


def test_configs_cover_the_space():
    """The generator is not degenerate: every kernel size, stride, dilation and odd sizes occur."""
    cfgs = [random_config(random.Random(seed)) for seed in range(NUM_CONFIGS)]
    assert {c["K"] for c in cfgs} == {1, 3, 5, 7}
    assert {c["stride"] for c in cfgs} == {1, 2, 3} and {c["dilation"] for c in cfgs} == {1, 2, 3}
    assert any(c["H"] % 2 and c["stride"] == 2 for c in cfgs) and any(c["Ho"] == 1 for c in cfgs)
    assert any(c["padding"] > c["dilation"] * (c["K"] - 1) // 2 for c in cfgs)
    assert sum(c["channels_last"] for c in cfgs) > NUM_CONFIGS // 10


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_involution_cpu(chunk):
    assert _run_chunk(involution, chunk, "cpu") == NUM_CONFIGS // CHUNKS


def test_involution_pytorch_cpu():
    """The pure-PyTorch path (ONNX, tracing, fallback) on the first 200 configurations."""
    assert _run_chunk(involution_pytorch, 0, "cpu") == NUM_CONFIGS // CHUNKS


@pytest.mark.cuda
@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_involution_cuda(chunk):
    assert _run_chunk(involution, chunk, "cuda") == NUM_CONFIGS // CHUNKS
