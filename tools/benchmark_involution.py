#!/usr/bin/env python
"""Benchmark the involution op at RedNet-50's stage shapes; prints a markdown table.

Paths: ``ours`` (``d2_involution.ops.involution``: the C++ kernels on CPU, the CuPy kernels on
CUDA), ``before`` (CPU: the C++ kernel of git revision ``--baseline``, built from that revision's
sources in this run, for a side-by-side comparison), ``pytorch`` (``involution_pytorch``, the
pure-PyTorch path), ``unfold`` (the unfold formulation of the official CPU code) and, on CUDA,
``naive`` (one thread per output element, the official kernel design) and the memory-bandwidth
``floor`` (bytes moved / measured copy bandwidth). ``--fused`` (CUDA) adds
a table of kernel generation fused into the aggregation (``cuda_kernel.fused_forward`` /
``fused_backward``, weights never in memory) against the unfused computation (conv2 of the
generator, then ``involution``), from the same reduced features.

``--layouts nchw nhwc`` runs every shape with contiguous and with channels_last inputs (weights
then stored pixel-major, as a channels_last kernel generator produces them). ``--layer`` times the
whole ``Involution`` module (kernel generation included) with ``fused=False`` and ``fused=True``
instead of the op.

Times are medians over ``--repeats`` runs, the paths of one row interleaved run by run so that the
load of a shared machine hits them alike. Peak memory is the extra memory above the inputs: on
CUDA from ``torch.cuda.max_memory_allocated``, on CPU from the growth of the peak resident set
(Linux ``/proc/self/clear_refs``) of a fresh subprocess per measurement, with glibc's mmap
threshold pinned so that freed tensors leave the resident set.

Examples::

    python tools/benchmark_involution.py --device cpu --paths ours before --baseline 7b4af3c
    python tools/benchmark_involution.py --device cpu --layer --layouts nchw nhwc
    python tools/benchmark_involution.py --device cuda --dtypes float32 bfloat16 float16
    python tools/benchmark_involution.py --device cuda --layouts nchw nhwc --fused
"""

import argparse
import importlib.util
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from d2_involution.layers import Involution
from d2_involution.ops import cpu_kernel, involution, involution_output_size, involution_pytorch

REPO = Path(__file__).resolve().parents[1]
# name: (channels, input size, stride); K = 7, group_channels = 16 as in RedNet-50.
SHAPES: Dict[str, Tuple[int, int, int]] = {
    "res2": (64, 56, 1),
    "res3": (128, 28, 1),
    "res4": (256, 14, 1),
    "res5": (512, 7, 1),
    "res3-down": (128, 56, 2),
    "res4-down": (256, 28, 2),
    "res5-down": (512, 14, 2),
}
DEFAULT_SHAPES = ["res2", "res3", "res4", "res5", "res3-down"]
DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
K, GROUP_CHANNELS = 7, 16
_baseline_rev: Optional[str] = None
_baseline_module = None


def involution_unfold(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """The unfold formulation: materialises a K*K times larger tensor."""
    N, C, H, W = x.shape
    _, G, k, _, Ho, Wo = weight.shape
    cols = F.unfold(x, k, padding=(k - 1) // 2, stride=stride).view(N, G, C // G, k * k, Ho, Wo)
    return (cols * weight.reshape(N, G, 1, k * k, Ho, Wo)).sum(3).view(N, C, Ho, Wo)


class _Naive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, stride):
        from d2_involution.ops import cuda_kernel

        ctx.save_for_backward(x, weight)
        ctx.stride = stride
        return cuda_kernel.naive_forward(x, weight, stride, (weight.shape[2] - 1) // 2, 1)

    @staticmethod
    def backward(ctx, grad):
        from d2_involution.ops import cuda_kernel

        x, w = ctx.saved_tensors
        s, p = ctx.stride, (w.shape[2] - 1) // 2
        gx = cuda_kernel.naive_grad_input(grad, w, x.shape[2], x.shape[3], s, p, 1)
        gw = cuda_kernel.naive_grad_weight(grad, x, w.shape[1], w.shape[2], s, p, 1)
        return gx, gw, None


def baseline_kernel():
    """``cpu_kernel`` of revision ``_baseline_rev`` (its .py and .cpp from git, built on import)."""
    global _baseline_module
    if _baseline_module is None:
        if _baseline_rev is None:
            raise ValueError("the 'before' path needs --baseline REV")
        folder = Path(tempfile.mkdtemp(prefix="d2inv_baseline_"))
        for name in ("cpu_kernel.py", "involution_cpu.cpp"):
            source = subprocess.run(
                ["git", "-C", str(REPO), "show", f"{_baseline_rev}:d2_involution/ops/{name}"],
                capture_output=True,
                check=True,
            ).stdout
            (folder / name).write_bytes(source)
        spec = importlib.util.spec_from_file_location(
            "baseline_cpu_kernel", folder / "cpu_kernel.py"
        )
        _baseline_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_baseline_module)
        if not _baseline_module.available():
            raise RuntimeError(f"baseline kernel: {_baseline_module.unavailable_reason()}")
    return _baseline_module


class _Before(torch.autograd.Function):
    """The baseline revision's C++ kernels, called as that revision's op called them."""

    @staticmethod
    def forward(ctx, x, weight, stride):
        kernel = baseline_kernel()
        x, weight = x.contiguous(), weight.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.stride = stride
        return kernel.forward(x, weight, stride, (weight.shape[2] - 1) // 2, 1)

    @staticmethod
    def backward(ctx, grad):
        kernel = baseline_kernel()
        x, w = ctx.saved_tensors
        s, p, grad = ctx.stride, (w.shape[2] - 1) // 2, grad.contiguous()
        gx = kernel.grad_input(grad, w, x.shape[2], x.shape[3], s, p, 1)
        gw = kernel.grad_weight(grad, x, w.shape[1], w.shape[2], s, p, 1)
        return gx, gw, None


def path_fn(path: str) -> Callable:
    return {
        "ours": lambda x, w, s: involution(x, w, stride=s),
        "before": _Before.apply,
        "pytorch": lambda x, w, s: involution_pytorch(x, w, stride=s),
        "unfold": involution_unfold,
        "naive": _Naive.apply,
    }[path]


def make_inputs(shape: str, batch: int, dtype: torch.dtype, device: str, grad: bool, layout: str):
    C, H, s = SHAPES[shape]
    Ho = involution_output_size(H, K, s)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, C, H, H, device=device, dtype=dtype, generator=g)
    w = torch.randn(
        batch, C // GROUP_CHANNELS, K, K, Ho, Ho, device=device, dtype=dtype, generator=g
    )
    go = torch.randn(batch, C, Ho, Ho, device=device, dtype=dtype, generator=g)
    if layout == "nhwc":
        x, go = (t.contiguous(memory_format=torch.channels_last) for t in (x, go))
        w = w.permute(0, 4, 5, 1, 2, 3).contiguous().permute(0, 3, 4, 5, 1, 2)
    return x.requires_grad_(grad), w.requires_grad_(grad), go, s


def make_layer_inputs(shape: str, batch: int, dtype: torch.dtype, device: str, layout: str):
    """An Involution module of the stage (default initialisation, training mode) and its input."""
    C, H, s = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    module = Involution(C, K, stride=s, group_channels=GROUP_CHANNELS)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    module = module.to(device=device, dtype=dtype, memory_format=fmt)
    x = torch.randn(batch, C, H, H, generator=g).to(device=device, dtype=dtype, memory_format=fmt)
    Ho = involution_output_size(H, K, s)
    go = torch.randn(batch, C, Ho, Ho, generator=g).to(device=device, dtype=dtype)
    return module, x.requires_grad_(), go.contiguous(memory_format=fmt)


def run_once(fn, x, w, go, s, backward: bool) -> None:
    if backward:
        fn(x, w, s).backward(go)
        x.grad = w.grad = None
    else:
        with torch.no_grad():
            fn(x, w, s)


def timed_ms(call: Callable[[], None], cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    call()
    return (time.perf_counter() - t0) * 1e3


def interleaved_medians(
    calls: Dict[str, Callable[[], None]], repeats: int, warmup: int, cuda: bool
) -> Dict[str, float]:
    """Median ms of each call, the calls run in turn within every repeat."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(timed_ms(call, cuda))
    return {name: statistics.median(t) for name, t in times.items()}


def cuda_peak_mib(fn, x, w, go, s, backward: bool) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run_once(fn, x, w, go, s, backward)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cpu_peak_mib(path: str, shape: str, batch: int, dtype: str, layout: str, backward: bool):
    """Peak resident-set growth of one call, measured in a fresh process.

    glibc's mmap threshold is pinned, so every large tensor is its own mapping, returned to the
    system when freed, and the peak RSS above the baseline is the peak of live extra memory.
    """
    spec = json.dumps([path, shape, batch, dtype, layout, backward, _baseline_rev])
    cmd = [sys.executable, os.path.abspath(__file__), "--_measure_rss", spec]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return float(out.strip().splitlines()[-1])


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def _measure_rss(spec: str) -> None:
    global _baseline_rev
    path, shape, batch, dtype, layout, backward, _baseline_rev = json.loads(spec)
    x, w, go, s = make_inputs(shape, batch, DTYPES[dtype], "cpu", backward, layout)
    fn = path_fn(path)
    run_once(fn, x, w, go, s, backward)  # first call: kernel build/load, lazy initialisations
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS to the current RSS
    before = _peak_rss_kib()
    run_once(fn, x, w, go, s, backward)
    print((_peak_rss_kib() - before) / 1024)


def bytes_moved(shape: str, batch: int, elem: int) -> Tuple[int, int]:
    """Compulsory bytes of the forward and of forward+backward (each tensor read/written once)."""
    C, H, s = SHAPES[shape]
    Ho = involution_output_size(H, K, s)
    x, out = batch * C * H * H, batch * C * Ho * Ho
    w = batch * (C // GROUP_CHANNELS) * K * K * Ho * Ho
    fwd = x + w + out
    # grad-input reads grad_out and weight, writes grad_x; grad-weight reads grad_out and x,
    # writes grad_weight.
    bwd = (out + w + x) + (out + x + w)
    return fwd * elem, (fwd + bwd) * elem


def copy_bandwidth_gbs(device: str) -> float:
    """Achievable DRAM bandwidth: a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = [timed_ms(lambda: dst.copy_(src), True) / 1e3 for _ in range(10)]
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def describe_machine(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
        except (OSError, StopIteration):
            pass
        name += f", {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
        name += f", C++ kernel threads: {cpu_kernel.thread_runtime()}"
    return f"{name}; torch {torch.__version__}"


def label_of(shape: str) -> str:
    C, H, s = SHAPES[shape]
    return f"{shape} ({C}@{H}x{H}, s{s})"


def op_rows(args, shape: str, dtype_name: str, layout: str, bandwidth) -> None:
    """One table row per path: fwd and fwd+bwd ms, peak memory, speed-ups vs the reference path."""
    cuda, dtype = args.device == "cuda", DTYPES[dtype_name]
    calls, inputs = {}, {}
    for path in args.paths:
        fn = path_fn(path)
        x, w, go, s = make_inputs(shape, args.batch, dtype, args.device, True, layout)
        inputs[path] = (fn, x, w, go, s)
        calls[(path, False)] = lambda a=(fn, x, w, go, s): run_once(*a, False)
        calls[(path, True)] = lambda a=(fn, x, w, go, s): run_once(*a, True)
    medians = interleaved_medians(calls, args.repeats, args.warmup, cuda)
    rows = {}
    for path in args.paths:
        if args.no_memory:
            mem = (float("nan"), float("nan"))
        elif cuda:
            mem = tuple(cuda_peak_mib(*inputs[path], b) for b in (False, True))
        else:
            mem = tuple(
                cpu_peak_mib(path, shape, args.batch, dtype_name, layout, b) for b in (False, True)
            )
        rows[path] = (medians[(path, False)], medians[(path, True)], *mem)
    base = rows.get(args.reference)
    for path, (fwd, both, m1, m2) in rows.items():
        up = f"{base[0] / fwd:.2f}x | {base[1] / both:.2f}x" if base else "- | -"
        print(
            f"| {label_of(shape)} | {dtype_name} | {layout} | {path} | {fwd:.3f} | {both:.3f} "
            f"| {m1:.0f} | {m2:.0f} | {up} |"
        )
    if bandwidth:
        fb, bb = bytes_moved(shape, args.batch, torch.finfo(dtype).bits // 8)
        print(
            f"| {label_of(shape)} | {dtype_name} | {layout} | floor | {fb / bandwidth / 1e6:.3f} "
            f"| {bb / bandwidth / 1e6:.3f} | - | - | - | - |"
        )


def layer_rows(args, shape: str, dtype_name: str, layout: str) -> None:
    """The Involution module, unfused and fused: fwd and fwd+bwd ms, fused speed-up."""
    cuda, dtype = args.device == "cuda", DTYPES[dtype_name]
    module, x, go = make_layer_inputs(shape, args.batch, dtype, args.device, layout)
    calls = {}
    for fused in (False, True):

        def forward(fused=fused):
            module.fused = fused
            with torch.no_grad():
                module(x)

        def both(fused=fused):
            module.fused = fused
            module(x).backward(go)
            x.grad = None
            module.zero_grad(set_to_none=True)

        calls[(fused, False)], calls[(fused, True)] = forward, both
    m = interleaved_medians(calls, args.repeats, args.warmup, cuda)
    print(
        f"| {label_of(shape)} | {dtype_name} | {layout} | {m[(False, False)]:.3f} "
        f"| {m[(True, False)]:.3f} | {m[(False, False)] / m[(True, False)]:.2f}x "
        f"| {m[(False, True)]:.3f} | {m[(True, True)]:.3f} "
        f"| {m[(False, True)] / m[(True, True)]:.2f}x |"
    )


def main(argv: Optional[List[str]] = None) -> None:
    global _baseline_rev
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="names or 'all'")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES))
    parser.add_argument("--layouts", nargs="+", default=["nchw"], choices=["nchw", "nhwc"])
    parser.add_argument("--paths", nargs="+", default=None, help="ours before pytorch unfold naive")
    parser.add_argument("--baseline", default=None, help="git revision of the 'before' path")
    parser.add_argument("--reference", default=None, help="path the speed-ups are relative to")
    parser.add_argument("--fused", action="store_true", help="CUDA: fused kernel generation too")
    parser.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 64 on CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 on CPU, 50 on CUDA")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory columns")
    parser.add_argument("--layer", action="store_true", help="Involution module, fused vs not")
    parser.add_argument("--_measure_rss", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._measure_rss:
        _measure_rss(args._measure_rss)
        return

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    _baseline_rev = args.baseline
    if args.fused and not cuda:
        parser.error("--fused: the fused kernels are CUDA kernels (use --device cuda)")
    shapes = list(SHAPES) if args.shapes == ["all"] else args.shapes
    dtypes = args.dtypes or (["float32", "bfloat16", "float16"] if cuda else ["float32"])
    default_paths = ["ours", "naive", "unfold"] if cuda else ["ours", "pytorch", "unfold"]
    args.paths = args.paths or default_paths
    if "before" in args.paths and not args.baseline:
        parser.error("--paths before: give --baseline REV (e.g. the parent commit)")
    args.reference = args.reference or ("before" if "before" in args.paths else "unfold")
    args.batch = args.batch or (64 if cuda else 8)
    args.repeats = args.repeats or (50 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    bandwidth = copy_bandwidth_gbs(args.device) if cuda and not args.layer else None

    print(f"Device: {describe_machine(args.device)}")
    print(f"Command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(
        f"Batch {args.batch}, K={K}, group_channels={GROUP_CHANNELS}; median of {args.repeats} "
        "interleaved runs."
    )
    if args.baseline:
        print(f"before = the C++ CPU kernel of revision {args.baseline}, built in this run.")
    if bandwidth:
        print(f"Measured copy bandwidth: {bandwidth:.0f} GB/s (used for the floor rows)")
    print()
    if args.layer:
        print(
            "| shape (C@HxW, stride) | dtype | layout | unfused fwd ms | fused fwd ms "
            "| fwd speed-up | unfused fwd+bwd ms | fused fwd+bwd ms | fwd+bwd speed-up |"
        )
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    else:
        print(
            "| shape (C@HxW, stride) | dtype | layout | path | fwd ms | fwd+bwd ms | fwd peak MiB "
            f"| fwd+bwd peak MiB | fwd speed-up vs {args.reference} "
            f"| fwd+bwd speed-up vs {args.reference} |"
        )
        print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for shape in shapes:
        for dtype_name in dtypes:
            for layout in args.layouts:
                if args.layer:
                    layer_rows(args, shape, dtype_name, layout)
                else:
                    op_rows(args, shape, dtype_name, layout, bandwidth)
                sys.stdout.flush()
    if args.fused:
        fused_table(args, shapes, dtypes)


# ---------------------------------------------------------------------------------------------
# --fused: kernel generation inside the aggregation vs conv2 + involution, same reduced features.


class _Generator:
    """The generator's reduced features r (N, C/4, Ho, Wo) and last 1x1 convolution (a, b),
    passed where the other paths take the weight (``grad`` is what run_once resets)."""

    def __init__(self, r: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        self.r, self.a, self.b, self.grad = r, a, b, None


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r, a, b, stride):
        from d2_involution.ops import cuda_kernel

        ctx.save_for_backward(x, r, a, b)  # the weights are not kept
        ctx.geometry = (stride, (K - 1) // 2, 1, K, a.shape[0] // (K * K))
        return cuda_kernel.fused_forward(x, r, a, b, *ctx.geometry)

    @staticmethod
    def backward(ctx, grad):
        from d2_involution.ops import cuda_kernel

        x, r, a, b = ctx.saved_tensors
        return (*cuda_kernel.fused_backward(grad, x, r, a, b, *ctx.geometry), None)


def _unfused(x, gen: _Generator, s: int):
    N, _, Ho, Wo = gen.r.shape
    w = F.conv2d(gen.r, gen.a[..., None, None], gen.b)
    return involution(x, w.view(N, -1, K, K, Ho, Wo), stride=s)


FUSED_PATHS = {
    "unfused": _unfused,
    "fused": lambda x, gen, s: _Fused.apply(x, gen.r, gen.a, gen.b, s),
}


def fused_inputs(shape: str, batch: int, dtype: torch.dtype, layout: str):
    x, _, go, s = make_inputs(shape, batch, dtype, "cuda", True, layout)
    C, Ho = x.shape[1], go.shape[2]
    G, Cr = C // GROUP_CHANNELS, C // 4
    g = torch.Generator(device="cuda").manual_seed(1)
    r = torch.randn(batch, Cr, Ho, Ho, device="cuda", dtype=dtype, generator=g)
    a = torch.randn(G * K * K, Cr, device="cuda", dtype=dtype, generator=g) / Cr**0.5
    b = torch.zeros(G * K * K, device="cuda", dtype=dtype)
    if layout == "nhwc":
        r = r.contiguous(memory_format=torch.channels_last)
    return x, _Generator(*(t.requires_grad_() for t in (r, a, b))), go, s


def fused_table(args, shapes: List[str], dtypes: List[str]) -> None:
    """--fused: the fused CUDA kernels vs conv2 + involution, interleaved run by run."""
    print()
    print(
        "| shape (C@HxW, stride) | dtype | layout | path | fwd ms | fwd+bwd ms | fwd peak MiB "
        "| fwd+bwd peak MiB | fwd speed-up vs unfused | fwd+bwd speed-up vs unfused |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for shape, dtype_name, layout in itertools.product(shapes, dtypes, args.layouts):
        inputs, calls = {}, {}
        for path, fn in FUSED_PATHS.items():
            x, gen, go, s = fused_inputs(shape, args.batch, DTYPES[dtype_name], layout)
            inputs[path] = (fn, x, gen, go, s)
            for b in (False, True):
                calls[(path, b)] = lambda a=inputs[path], b=b: run_once(*a, b)
        medians = interleaved_medians(calls, args.repeats, args.warmup, True)
        base = medians[("unfused", False)], medians[("unfused", True)]
        for path in FUSED_PATHS:
            fwd, both = medians[(path, False)], medians[(path, True)]
            nan = float("nan")
            m1, m2 = (
                (nan, nan)
                if args.no_memory
                else [cuda_peak_mib(*inputs[path], b) for b in (False, True)]
            )
            print(
                f"| {label_of(shape)} | {dtype_name} | {layout} | {path} | {fwd:.3f} | {both:.3f} "
                f"| {m1:.0f} | {m2:.0f} | {base[0] / fwd:.2f}x | {base[1] / both:.2f}x |"
            )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
