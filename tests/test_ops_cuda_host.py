"""cuda_kernel.py's host logic without a GPU: a fake CuPy (tests/cuda_emulation.py) whose kernels
are the host-compiled .cu code runs the ops end to end on CPU tensors, so the kernel choice per
layout, the launch configuration read from the module, grid and shared memory, the occupancy
query, the fallbacks (naive kernels, unfused computation), the int32 guard, batch splitting, the
stream and the compiled code are all checked, each result against the reference."""

import pytest
import torch

from cuda_emulation import CXX, FakeCupy  # tests/ is on sys.path  # isort: skip
from involution_reference import reference  # isort: skip

from d2_involution.ops import cuda_kernel, involution_output_size

pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler to emulate the kernels")
STREAM = 0xBEEF
OPS = ("forward", "grad_input", "grad_weight")


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


def check_against_reference(results, x, w, go, geo):
    dtype = x.dtype
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    out = reference(xd, wd, *geo)
    refs = (out.detach(), *torch.autograd.grad(out, (xd, wd), go.double()))
    eps = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype) or torch.finfo(dtype).eps
    for name, got, ref in zip(("out", "grad_x", "grad_w"), results, refs):
        assert got.dtype == dtype, name
        tol = dict(rtol=eps, atol=eps * max(1.0, ref.abs().max().item()))
        torch.testing.assert_close(got.double(), ref, **tol, msg=lambda m: f"{name}: {m}")


CASES = [
    # (dtype, N, C, G, H, W, K, stride, padding, dilation): odd sizes, stride 2, dilation,
    # explicit padding, and a K the tiled kernels do not take (naive path).
    (torch.float64, 2, 12, 3, 9, 11, 3, 2, None, 1),
    (torch.float32, 1, 32, 2, 10, 7, 7, 1, None, 1),
    (torch.bfloat16, 2, 16, 1, 8, 9, 5, 2, 1, 2),
    (torch.float16, 1, 16, 2, 7, 7, 7, 2, None, 1),
    (torch.float64, 1, 8, 2, 9, 10, 15, 2, None, 1),
]


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=[f"{str(c[0])[6:]}-K{c[6]}s{c[7]}" for c in CASES])
def test_host_path_matches_reference(make_fake, case, layout):
    dtype, N, C, G, H, W, K, stride, padding, dilation = case
    fake = make_fake()
    x, w, go, geo = make(N, C, G, H, W, K, stride, padding, dilation, dtype)
    if layout == "nhwc":
        x, go = (t.contiguous(memory_format=torch.channels_last) for t in (x, go))
    results = run_all(x, w, go, geo)
    check_against_reference(results, x, w, go, geo)
    for t in results[:2]:
        assert cuda_kernel.layout_of(t) == layout
    names = [launch.name for launch in fake.launches]
    if K > 13:
        assert names == [f"involution_naive_{op}" for op in OPS]
        assert all(launch.block == (128,) for launch in fake.launches)
        return
    assert names == [f"involution_{op}_{layout}" for op in OPS]
    for launch in fake.launches:
        assert launch.stream == STREAM
        module = next(m for m in fake.modules if launch.options == m.options)
        threads, rows, cols, chunks, smem, channels = cuda_kernel._read_config(module, launch.name)
        assert launch.block == (threads,) and launch.shared_mem == smem > 0
        assert launch.grid[2] == N
        for t in launch.tensors:  # every tensor in the kernel's layout
            if t is not None and t.dim() == 4:
                assert cuda_kernel.layout_of(t) == layout, launch.name
        if launch.name.startswith("involution_forward"):
            Ho, Wo = results[0].shape[2:]
            cpc = -(-C // G // channels)
            assert launch.grid[:2] == (-(-Ho // rows) * -(-Wo // cols), -(-G * cpc // chunks))


def test_weights_reach_nhwc_kernels_as_generator_output(make_fake):
    """NHWC kernels read the weight as the channels_last (N, G*K*K, Ho, Wo) view: given in that
    form it is passed without a copy; given contiguous it is converted."""
    fake = make_fake()
    x, w, go, geo = make(2, 16, 2, 9, 8, 3, 1)
    x = x.contiguous(memory_format=torch.channels_last)
    w_cl = cuda_kernel.weight_as_layout(w, "nhwc")
    assert w_cl.data_ptr() != w.data_ptr() and not w_cl.is_contiguous()
    out = cuda_kernel.forward(x, w_cl, *geo)
    assert fake.launches[-1].tensors[1].data_ptr() == w_cl.data_ptr()
    torch.testing.assert_close(out, cuda_kernel.forward(x, w, *geo), rtol=0, atol=0)
    converted = fake.launches[-1].tensors[1]
    assert converted is not w and torch.equal(converted, w)
    assert converted.stride() == w_cl.stride()


def test_launch_configuration_and_occupancy(make_fake):
    """Shared memory above 48 KB raises the kernel's limit and carveout; the occupancy query uses
    the kernel's real block size and shared memory; a kernel no SM can hold runs naive."""
    fake = make_fake()
    x, w, go, geo = make(1, 64, 4, 9, 9, 7, dtype=torch.float32)
    run_all(x, w, go, geo)
    queries = {name: (threads, smem) for name, threads, smem in fake.occupancy_queries}
    for op in OPS:
        name = f"involution_{op}_nchw"
        kernel = next(k for key, k in cuda_kernel._kernels.items() if key[0] == name)
        cfg = kernel.config
        assert queries[name] == (cfg.threads, cfg.smem)
        big = cfg.smem > 48 * 1024
        assert kernel.fn.max_dynamic_shared_size_bytes == (cfg.smem if big else 0)
        assert kernel.fn.preferred_shared_memory_carveout == (100 if big else -1)
    assert any(k.config and k.config.smem > 48 * 1024 for k in cuda_kernel._kernels.values())
    fake = make_fake(blocks_per_sm=0)
    check_against_reference(run_all(x, w, go, geo), x, w, go, geo)
    assert [launch.name for launch in fake.launches] == [f"involution_naive_{op}" for op in OPS]


def test_spilling_or_large_k_instantiations_run_the_naive_kernel(make_fake):
    fake = make_fake(local_size_bytes={"involution_grad_input_nchw": 16})
    x, w, go, geo = make(1, 8, 1, 9, 9, 7, 2)
    check_against_reference(run_all(x, w, go, geo), x, w, go, geo)
    assert [launch.name for launch in fake.launches] == [
        "involution_forward_nchw",
        "involution_naive_grad_input",
        "involution_grad_weight_nchw",
    ]
    # fp64, K = 9: each op by FAST_MAX_K.
    fake = make_fake()
    x, w, go, geo = make(1, 4, 1, 12, 12, 9)
    check_against_reference(run_all(x, w, go, geo), x, w, go, geo)
    expected = [
        (
            f"involution_{op}_nchw"
            if 9 <= cuda_kernel.FAST_MAX_K[op][torch.float64]
            else f"involution_naive_{op}"
        )
        for op in OPS
    ]
    assert [launch.name for launch in fake.launches] == expected
    # Beyond every entry no tiled kernel is even compiled.
    fake = make_fake()
    run_all(*make(1, 4, 1, 16, 16, 15))
    assert fake.modules and not any("-DD2I_K=15" in m.options for m in fake.modules)


def test_batches_beyond_the_grid_limit_are_split(make_fake, monkeypatch):
    monkeypatch.setattr(cuda_kernel, "_MAX_IMAGES", 2)
    fake = make_fake()
    x, w, go, geo = make(5, 8, 2, 7, 6, 3)
    check_against_reference(run_all(x, w, go, geo), x, w, go, geo)
    assert [launch.grid[2] for launch in fake.launches] == [2, 2, 1] * 3
    assert [launch.ints[0] for launch in fake.launches] == [2, 2, 1] * 3


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
    """CuPy's disk cache keys binaries by code + options: the headers must be part of the code."""
    fake = make_fake()
    x, w, go, geo = make(1, 4, 1, 5, 5, 3)
    run_all(x, w, go, geo)

    def lines(name):
        text = (cuda_kernel.SOURCE_DIR / name).read_text()
        return [line for line in text.splitlines() if not line.startswith("#include")]

    for module in fake.modules:
        assert "#include" not in module.code
        assert all(line in module.code for line in lines("involution_common.cuh"))
    tiled = [m for m in fake.modules if "-DD2I_K=3" in m.options]
    assert tiled and all(line in m.code for m in tiled for line in lines("involution_tile.cuh"))
    source_dir = tmp_path / "ops"
    source_dir.mkdir()
    for path in cuda_kernel.SOURCE_DIR.glob("*.cu*"):
        (source_dir / path.name).write_text(path.read_text())
    before = cuda_kernel.kernel_source(source_dir / "involution_cuda.cu")
    edited = source_dir / "involution_common.cuh"
    edited.write_text(edited.read_text() + "\n// edited\n")
    after = cuda_kernel.kernel_source(source_dir / "involution_cuda.cu")
    assert after != before and after.count("// edited") == 1  # nested, inlined once


# ------------------------------------------------------------------------------------------------
# The fused host functions


def fused_problem(dtype=torch.float32, layout="nchw", K=3, stride=1, N=2, C=16, G=2, Cr=4):
    g = torch.Generator().manual_seed(0)
    H, W, padding = 9, 8, (K - 1) // 2
    Ho, Wo = (involution_output_size(s, K, stride, padding) for s in (H, W))
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    r = torch.randn(N, Cr, Ho, Wo, generator=g, dtype=torch.float64).to(dtype)
    a = torch.randn(G * K * K, Cr, 1, 1, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(G * K * K, generator=g, dtype=torch.float64).to(dtype)
    go = torch.randn(N, C, Ho, Wo, generator=g, dtype=torch.float64).to(dtype)
    if layout == "nhwc":
        x, r, go = (t.contiguous(memory_format=torch.channels_last) for t in (x, r, go))
    return x, r, a, b, go, (stride, padding, 1, K, G)


def unfused_reference(x, r, a, b, go, args):
    stride, padding, dilation, K, G = args
    leaves = [t.double().requires_grad_() for t in (x, r, a, b)]
    N, _, Ho, Wo = r.shape
    weight = torch.nn.functional.conv2d(leaves[1], leaves[2], leaves[3])
    out = reference(leaves[0], weight.reshape(N, G, K, K, Ho, Wo), stride, padding, dilation)
    return (out, *torch.autograd.grad(out, leaves, go.double()))


def check_fused(results, refs):
    for name, got, ref in zip(("out", "gx", "gr", "ga", "gb"), results, refs):
        assert got.shape == ref.shape, name
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_fused_functions_run_their_kernels(make_fake, layout):
    fake = make_fake()
    x, r, a, b, go, args = fused_problem(layout=layout)
    out = cuda_kernel.fused_forward(x, r, a, b, *args)
    grads = cuda_kernel.fused_backward(go, x, r, a, b, *args)
    check_fused((out, *grads), unfused_reference(x, r, a, b, go, args))
    assert [launch.name for launch in fake.launches] == [
        f"involution_fused_forward_{layout}",
        f"involution_fused_grad_input_{layout}",
        f"involution_grad_weight_acc_{layout}",
    ]
    assert fake.launches[0].ints[8] == r.shape[1]  # Cr
    at = fake.launches[0].tensors[2]
    assert at.is_contiguous() and torch.equal(at, a.reshape(a.shape[0], -1).t())
    for t in (out, grads[0], grads[1]):
        assert cuda_kernel.layout_of(t) == layout
    assert grads[2].shape == a.shape and grads[3].shape == b.shape


def test_fused_functions_fall_back_to_the_unfused_computation(make_fake):
    """Where a fused kernel may not run (here: it spills), the weights are generated by the 1x1
    convolution and the plain kernels run: same results."""
    fake = make_fake(
        local_size_bytes={
            "involution_fused_forward_nchw": 8,
            "involution_fused_grad_input_nchw": 8,
        }
    )
    x, r, a, b, go, args = fused_problem()
    out = cuda_kernel.fused_forward(x, r, a, b, *args)
    grads = cuda_kernel.fused_backward(go, x, r, a, b, *args)
    check_fused((out, *grads), unfused_reference(x, r, a, b, go, args))
    assert [launch.name for launch in fake.launches] == [
        "involution_forward_nchw",
        "involution_grad_input_nchw",
        "involution_grad_weight_acc_nchw",
    ]


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(a=torch.zeros(17, 4)), r"gen_weight must be \(G\*K\*K, Cr\) = \(18, 4\)"),
        (dict(b=torch.zeros(17)), r"gen_bias must be \(18,\)"),
        (dict(r=torch.zeros(2, 4, 9, 7)), r"r spatial size \(9, 7\) must be the output size"),
        (dict(r=torch.zeros(1, 4, 9, 8)), r"r must be \(N, Cr, Ho, Wo\) with N=2"),
        (dict(b=torch.zeros(18, dtype=torch.float64)), r"gen_bias must be torch.float32"),
    ],
)
def test_fused_functions_reject_inconsistent_tensors(make_fake, change, message):
    fake = make_fake()
    x, r, a, b, go, args = fused_problem()
    tensors = dict(dict(r=r, a=a, b=b), **change)
    with pytest.raises(ValueError, match=message):
        cuda_kernel.fused_forward(x, tensors["r"], tensors["a"], tensors["b"], *args)
    with pytest.raises(ValueError, match=message):
        cuda_kernel.fused_backward(go, x, tensors["r"], tensors["a"], tensors["b"], *args)
    assert not fake.launches
