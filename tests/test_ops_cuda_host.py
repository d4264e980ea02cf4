"""cuda_kernel.py's host logic without a GPU: a fake CuPy (tests/cuda_emulation.py) whose kernels
are the host-compiled .cu code runs forward / grad-input / grad-weight end to end on CPU tensors,
so argument order, grid size, channel chunks, the naive-kernel switch, the int32 plane guard,
contiguity, the stream and the compiled code are all checked against the reference."""

import pytest
import torch

from cuda_emulation import CXX, FakeCupy  # tests/ is on sys.path  # isort: skip
from involution_reference import reference  # isort: skip

from d2_involution.ops import cuda_kernel, involution_output_size

pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler to emulate the kernels")
STREAM = 0xBEEF


@pytest.fixture
def make_fake(tmp_path_factory, monkeypatch):
    """Installs a FakeCupy(**kwargs) in cuda_kernel, with empty caches and a fixed torch stream."""

    def install(**kwargs) -> FakeCupy:
        fake = FakeCupy(tmp_path_factory.getbasetemp() / "fake_cupy", **kwargs)
        monkeypatch.setattr(cuda_kernel, "_cupy", fake)
        for cache in ("_modules", "_kernels", "_streams"):
            monkeypatch.setattr(cuda_kernel, cache, {})
        monkeypatch.setattr(cuda_kernel, "_torch_stream_ptr", lambda device_index: STREAM)
        return fake

    return install


def make(N, C, G, H, W, K, stride=1, padding=None, dilation=1, dtype=torch.float64, seed=0):
    """x, weight, grad_out and the geometry (stride, padding, dilation) of one problem."""
    padding = dilation * (K - 1) // 2 if padding is None else padding
    Ho = involution_output_size(H, K, stride, padding, dilation)
    Wo = involution_output_size(W, K, stride, padding, dilation)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(N, G, K, K, Ho, Wo, generator=g, dtype=torch.float64).to(dtype)
    go = torch.randn(N, C, Ho, Wo, generator=g, dtype=torch.float64).to(dtype)
    return x, w, go, (stride, padding, dilation)


def run_all(x, w, go, geo):
    H, W = x.shape[2:]
    G, K = w.shape[1], w.shape[2]
    return (
        cuda_kernel.forward(x, w, *geo),
        cuda_kernel.grad_input(go, w, H, W, *geo),
        cuda_kernel.grad_weight(go, x, G, K, *geo),
    )


def check_against_reference(results, x, w, go, geo, dtype):
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    out = reference(xd, wd, *geo)
    refs = (out.detach(), *torch.autograd.grad(out, (xd, wd), go.double()))
    eps = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype) or torch.finfo(dtype).eps
    for name, got, ref in zip(("out", "grad_x", "grad_w"), results, refs):
        assert got.dtype == dtype and got.is_contiguous(), name
        tol = dict(rtol=eps, atol=eps * max(1.0, ref.abs().max().item()))
        torch.testing.assert_close(got.double(), ref, **tol, msg=lambda m: f"{name}: {m}")


CASES = [
    # (dtype, N, C, G, H, W, K, stride, padding, dilation): odd sizes, stride 2, dilation,
    # explicit padding, and a K the fast kernels do not take (naive path).
    (torch.float64, 2, 12, 3, 9, 11, 3, 2, None, 1),
    (torch.float32, 1, 32, 2, 10, 7, 7, 1, None, 1),
    (torch.bfloat16, 2, 16, 1, 8, 9, 5, 2, 1, 2),
    (torch.float16, 1, 16, 2, 7, 7, 7, 2, None, 1),
    (torch.float64, 1, 8, 2, 9, 10, 13, 2, None, 1),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{str(c[0])[6:]}-K{c[6]}s{c[7]}" for c in CASES])
def test_host_path_matches_reference(make_fake, case):
    dtype, N, C, G, H, W, K, stride, padding, dilation = case
    fake = make_fake()
    x, w, go, geo = make(N, C, G, H, W, K, stride, padding, dilation, dtype)
    check_against_reference(run_all(x, w, go, geo), x, w, go, geo, dtype)
    names = [launch.name for launch in fake.launches]
    fast = ["involution_forward", "involution_grad_input", "involution_grad_weight"]
    naive = [n.replace("involution_", "involution_naive_") for n in fast]
    assert names == [naive[i] if K == 13 else fast[i] for i in range(3)]
    for launch in fake.launches:
        assert launch.block == (128,) and launch.grid == ((launch.total + 127) // 128,)
        assert launch.stream == STREAM


def test_channels_last_and_strided_inputs_reach_the_kernels_contiguous(make_fake):
    fake = make_fake()
    x, w, go, geo = make(2, 16, 2, 9, 8, 3, 2)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w_t = w.transpose(4, 5).contiguous().transpose(4, 5)  # same values, non-contiguous
    go_cl = go.contiguous(memory_format=torch.channels_last)
    results = run_all(x_cl, w_t, go_cl, geo)
    check_against_reference(results, x, w, go, geo, torch.float64)
    for launch in fake.launches:
        assert all(t.is_contiguous() for t in launch.tensors), launch.name


def test_channel_chunk_follows_occupancy(make_fake):
    """Chunks halve (not below 8) until the grid holds two waves of resident threads."""
    for sms, blocks_per_sm, plane, chunk in [
        # (SMs, blocks an SM, plane side, chunk): 64 channels in one group.
        (4, 2, 8, 8),  # 2 * 4 * 2 * 128 = 2048 threads wanted: 64 px * 8 chunks of 8 = 512
        (1, 1, 8, 16),  # 256 wanted: 4 chunks of 16 give 64 * 4 = 256
        (1, 1, 16, 64),  # 256 px already: the whole group
    ]:
        fake = make_fake(sms=sms, blocks_per_sm=blocks_per_sm)
        x, w, go, geo = make(1, 64, 1, plane, plane, 3)
        results = run_all(x, w, go, geo)
        check_against_reference(results, x, w, go, geo, torch.float64)
        forward, grad_input = fake.launches[0], fake.launches[1]
        n_chunks = 64 // chunk
        for launch in (forward, grad_input):
            assert launch.ints[-2:] == [chunk, n_chunks], (sms, blocks_per_sm, launch.ints)
            assert launch.total == n_chunks * plane * plane


def test_spilling_or_large_k_instantiations_run_the_naive_kernel(make_fake):
    fake = make_fake(local_size_bytes={"involution_grad_input": 16})
    x, w, go, geo = make(1, 8, 1, 9, 9, 7, 2)
    check_against_reference(run_all(x, w, go, geo), x, w, go, geo, torch.float64)
    assert [launch.name for launch in fake.launches] == [
        "involution_forward",
        "involution_naive_grad_input",
        "involution_grad_weight",
    ]
    # fp32, K = 11: each op by FAST_MAX_K (forward and grad-input spill there, grad-weight not).
    fake = make_fake()
    x, w, go, geo = make(1, 4, 1, 12, 12, 11, dtype=torch.float32)
    check_against_reference(run_all(x, w, go, geo), x, w, go, geo, torch.float32)
    expected = [
        f"involution_{'' if 11 <= cuda_kernel.FAST_MAX_K[op][torch.float32] else 'naive_'}{op}"
        for op in ("forward", "grad_input", "grad_weight")
    ]
    assert [launch.name for launch in fake.launches] == expected
    # Beyond every entry no fast kernel is even compiled.
    fake = make_fake()
    run_all(*make(1, 4, 1, 14, 14, 13))
    assert fake.modules and not any("-DD2I_K=13" in m.options for m in fake.modules)


def test_int32_plane_guard_raises_before_allocating(make_fake):
    fake = make_fake()
    H = W = 46341  # H * W = 2_147_488_281 > 2**31 - 1
    x = torch.zeros(1, 1, 1, 1).expand(1, 1, H, W)
    w = torch.zeros(1, 1, 1, 1, 1, 1).expand(1, 1, 1, 1, H, W)
    with pytest.raises(ValueError, match=r"must fit in int32"):
        cuda_kernel.forward(x, w, 1, 0, 1)
    with pytest.raises(ValueError, match=r"must fit in int32"):
        cuda_kernel.grad_input(x, w, H, W, 1, 0, 1)
    with pytest.raises(ValueError, match=r"must fit in int32"):
        cuda_kernel.grad_weight(x, x, 1, 1, 1, 0, 1)
    assert not fake.launches and not fake.modules


def test_stream_from_torch_with_cupy_13_fallback(make_fake):
    x, w, go, geo = make(1, 4, 1, 5, 5, 3)
    fake = make_fake(from_external=False)  # CuPy 13: no Stream.from_external
    cuda_kernel.forward(x, w, *geo)
    cuda_kernel.forward(x, w, *geo)
    assert fake.external_streams == [(STREAM, None)]  # made once, then cached
    assert [launch.stream for launch in fake.launches] == [STREAM, STREAM]
    fake = make_fake()  # CuPy 14: Stream.from_external through the CUDA stream protocol
    cuda_kernel.forward(x, w, *geo)
    assert not fake.external_streams and fake.launches[0].stream == STREAM


def test_compiled_code_includes_every_source(make_fake, tmp_path, monkeypatch):
    """CuPy's disk cache keys binaries by code + options: the header must be part of the code."""
    fake = make_fake()
    x, w, go, geo = make(1, 4, 1, 5, 5, 3)
    run_all(x, w, go, geo)
    header = cuda_kernel.COMMON_HEADER.read_text()
    for module in fake.modules:
        assert "#include" not in module.code and header.strip() in module.code
    edited = tmp_path / cuda_kernel.COMMON_HEADER.name
    edited.write_text(header + "\n// edited\n")
    before = cuda_kernel.kernel_source(cuda_kernel.FAST_SOURCE)
    monkeypatch.setattr(cuda_kernel, "COMMON_HEADER", edited)
    after = cuda_kernel.kernel_source(cuda_kernel.FAST_SOURCE)
    assert after != before and after.count("// edited") == 1
