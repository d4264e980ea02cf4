#!/usr/bin/env python
"""Benchmark the involution op at RedNet-50's stage shapes; prints a markdown table.

Paths: ``ours`` (``d2_involution.ops.involution``: the C++ kernel on CPU, the CuPy kernels on
CUDA), ``pytorch`` (``involution_pytorch``, the pure-PyTorch path), ``unfold`` (the unfold
formulation of the official CPU code) and, on CUDA, ``naive`` (one thread per output element, the
official kernel design) and the memory-bandwidth ``floor`` (bytes moved / measured copy bandwidth).
``--layouts nchw nhwc`` also runs every path on channels_last inputs (rows "PATH (nhwc)"; the
weights then are the channels_last kernel-generator output the NHWC CUDA kernels read).
``--fused`` (CUDA) adds a table of kernel generation fused into the aggregation
(``cuda_kernel.fused_forward`` / ``fused_backward``, weights never in memory) against the unfused
computation (conv2 of the generator, then ``involution``), from the same reduced features.

Times are medians over ``--repeats`` runs. Peak memory is the extra memory above the inputs:
on CUDA from ``torch.cuda.max_memory_allocated``, on CPU from the growth of the peak resident
set (Linux ``/proc/self/clear_refs``) of a fresh subprocess per measurement, with glibc's mmap
threshold pinned so that freed tensors leave the resident set.

Examples::

    python tools/benchmark_involution.py --device cpu --repeats 5
    python tools/benchmark_involution.py --device cuda --dtypes float32 bfloat16 float16
    python tools/benchmark_involution.py --device cuda --layouts nchw nhwc --fused
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from d2_involution.ops import involution, involution_output_size, involution_pytorch

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


def path_fn(path: str) -> Callable:
    return {
        "ours": lambda x, w, s: involution(x, w, stride=s),
        "pytorch": lambda x, w, s: involution_pytorch(x, w, stride=s),
        "unfold": involution_unfold,
        "naive": _Naive.apply,
    }[path]


def make_inputs(
    shape: str, batch: int, dtype: torch.dtype, device: str, grad: bool, layout: str = "nchw"
):
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


def run_once(fn, x, w, go, s, backward: bool) -> None:
    if backward:
        fn(x, w, s).backward(go)
        x.grad = w.grad = None
    else:
        with torch.no_grad():
            fn(x, w, s)


def time_ms(fn, x, w, go, s, backward: bool, repeats: int, warmup: int) -> float:
    cuda = x.is_cuda
    for _ in range(warmup):
        run_once(fn, x, w, go, s, backward)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run_once(fn, x, w, go, s, backward)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run_once(fn, x, w, go, s, backward)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cuda_peak_mib(fn, x, w, go, s, backward: bool) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run_once(fn, x, w, go, s, backward)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cpu_peak_mib(path: str, shape: str, batch: int, dtype: str, backward: bool) -> float:
    """Peak resident-set growth of one call, measured in a fresh process.

    glibc's mmap threshold is pinned, so every large tensor is its own mapping, returned to the
    system when freed, and the peak RSS above the baseline is the peak of live extra memory.
    """
    spec = json.dumps([path, shape, batch, dtype, backward])
    cmd = [sys.executable, os.path.abspath(__file__), "--_measure_rss", spec]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return float(out.strip().splitlines()[-1])


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def _measure_rss(spec: str) -> None:
    path, shape, batch, dtype, backward = json.loads(spec)
    x, w, go, s = make_inputs(shape, batch, DTYPES[dtype], "cpu", backward)
    fn = path_fn(path)
    run_once(fn, x, w, go, s, backward)  # first call: kernel build/load, lazy initialisations
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS to the current RSS
    before = _peak_rss_kib()
    run_once(fn, x, w, go, s, backward)
    print((_peak_rss_kib() - before) / 1024)


def compare_cpu_variants(shapes: List[str], batch: int, repeats: int) -> None:
    """Row vs channel-tiled C++ kernels (``D2INV_CPU_TILED``), interleaved run by run so that the
    load of a shared machine hits both alike; prints a markdown table of median ms."""
    from d2_involution.ops import cpu_kernel

    print("| shape (C@HxW, stride) | kernel | rows ms | tiled ms | picked |")
    print("|---|---|---:|---:|---|")
    for shape in shapes:
        C, H, s = SHAPES[shape]
        x, w, go, s = make_inputs(shape, batch, torch.float32, "cpu", False)
        G, Wo = w.shape[1], w.shape[5]
        p = (K - 1) // 2
        calls = {
            "forward": lambda: cpu_kernel.forward(x, w, s, p, 1),
            "grad_input": lambda: cpu_kernel.grad_input(go, w, H, H, s, p, 1),
            "grad_weight": lambda: cpu_kernel.grad_weight(go, x, G, K, s, p, 1),
        }
        for name, call in calls.items():
            picked = "tiled" if cpu_kernel.use_tiled(name, Wo, s) else "rows"
            times = {"0": [], "1": []}
            for _ in range(repeats):
                for variant in ("0", "1"):
                    os.environ["D2INV_CPU_TILED"] = variant
                    t0 = time.perf_counter()
                    call()
                    times[variant].append((time.perf_counter() - t0) * 1e3)
            os.environ.pop("D2INV_CPU_TILED")
            rows, tiled = (statistics.median(times[v]) for v in ("0", "1"))
            print(f"| {shape} ({C}@{H}x{H}, s{s}) | {name} | {rows:.1f} | {tiled:.1f} | {picked} |")
            sys.stdout.flush()


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
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
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
    return f"{name}; torch {torch.__version__}"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="names or 'all'")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES))
    parser.add_argument("--paths", nargs="+", default=None, help="ours pytorch unfold naive")
    parser.add_argument("--layouts", nargs="+", default=["nchw"], choices=["nchw", "nhwc"])
    parser.add_argument("--fused", action="store_true", help="CUDA: fused kernel generation too")
    parser.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 64 on CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 on CPU, 50 on CUDA")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory columns")
    parser.add_argument(
        "--cpu-variants", action="store_true", help="compare the row and tiled C++ kernels only"
    )
    parser.add_argument("--_measure_rss", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._measure_rss:
        _measure_rss(args._measure_rss)
        return

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    if args.fused and not cuda:
        parser.error("--fused: the fused kernels are CUDA kernels (use --device cuda)")
    shapes = list(SHAPES) if args.shapes == ["all"] else args.shapes
    dtypes = args.dtypes or (["float32", "bfloat16", "float16"] if cuda else ["float32"])
    paths = args.paths or (["ours", "naive", "unfold"] if cuda else ["ours", "pytorch", "unfold"])
    batch = args.batch or (64 if cuda else 8)
    repeats = args.repeats or (50 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    bandwidth = copy_bandwidth_gbs(args.device) if cuda else None

    print(f"Device: {describe_machine(args.device)}")
    print(f"Command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    if args.cpu_variants:
        print(f"Batch {batch}, K={K}; median of {repeats} interleaved runs.\n")
        compare_cpu_variants(shapes, batch, repeats)
        return
    print(f"Batch {batch}, K={K}, group_channels={GROUP_CHANNELS}; median of {repeats} runs.")
    if bandwidth:
        print(f"Measured copy bandwidth: {bandwidth:.0f} GB/s (used for the floor rows)")
    print()
    print(
        "| shape (C@HxW, stride) | dtype | path | fwd ms | fwd+bwd ms | fwd peak MiB "
        "| fwd+bwd peak MiB | fwd speed-up vs unfold | fwd+bwd speed-up vs unfold |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for shape in shapes:
        C, H, s = SHAPES[shape]
        label = f"{shape} ({C}@{H}x{H}, s{s})"
        for dtype_name, layout in ((d, lay) for d in dtypes for lay in args.layouts):
            dtype = DTYPES[dtype_name]
            rows = {}
            for path in paths:
                fn = path_fn(path)
                x, w, go, s = make_inputs(shape, batch, dtype, args.device, True, layout)
                fwd = time_ms(fn, x, w, go, s, False, repeats, warmup)
                both = time_ms(fn, x, w, go, s, True, repeats, warmup)
                if args.no_memory:
                    mem = (float("nan"), float("nan"))
                elif cuda:
                    mem = (
                        cuda_peak_mib(fn, x, w, go, s, False),
                        cuda_peak_mib(fn, x, w, go, s, True),
                    )
                else:
                    del x, w, go
                    mem = tuple(
                        cpu_peak_mib(path, shape, batch, dtype_name, b) for b in (False, True)
                    )
                rows[path if layout == "nchw" else f"{path} (nhwc)"] = (fwd, both, *mem)
            base = rows.get("unfold" if layout == "nchw" else "unfold (nhwc)")
            for path, (fwd, both, m1, m2) in rows.items():
                up = f"{base[0] / fwd:.1f}x | {base[1] / both:.1f}x" if base else "- | -"
                print(
                    f"| {label} | {dtype_name} | {path} | {fwd:.3f} | {both:.3f} | {m1:.0f} "
                    f"| {m2:.0f} | {up} |"
                )
            if bandwidth and layout == args.layouts[0]:
                fb, bb = bytes_moved(shape, batch, torch.finfo(dtype).bits // 8)
                print(
                    f"| {label} | {dtype_name} | floor | {fb / bandwidth / 1e6:.3f} "
                    f"| {bb / bandwidth / 1e6:.3f} | - | - | - | - |"
                )
            sys.stdout.flush()
    if args.fused:
        fused_table(shapes, dtypes, args.layouts, batch, repeats, warmup, args.no_memory)


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


def fused_table(shapes, dtypes, layouts, batch, repeats, warmup, no_memory) -> None:
    print()
    print(
        "| shape (C@HxW, stride) | dtype | layout | path | fwd ms | fwd+bwd ms | fwd peak MiB "
        "| fwd+bwd peak MiB | fwd speed-up vs unfused | fwd+bwd speed-up vs unfused |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for shape in shapes:
        C, H, s = SHAPES[shape]
        for dtype_name, layout in ((d, lay) for d in dtypes for lay in layouts):
            rows = {}
            for path, fn in FUSED_PATHS.items():
                x, gen, go, s = fused_inputs(shape, batch, DTYPES[dtype_name], layout)
                times = [time_ms(fn, x, gen, go, s, b, repeats, warmup) for b in (False, True)]
                nan = float("nan")
                mem = (
                    [nan, nan]
                    if no_memory
                    else [cuda_peak_mib(fn, x, gen, go, s, b) for b in (False, True)]
                )
                rows[path] = (*times, *mem)
            base = rows["unfused"]
            for path, (fwd, both, m1, m2) in rows.items():
                print(
                    f"| {shape} ({C}@{H}x{H}, s{s}) | {dtype_name} | {layout} | {path} "
                    f"| {fwd:.3f} | {both:.3f} | {m1:.0f} | {m2:.0f} | {base[0] / fwd:.2f}x "
                    f"| {base[1] / both:.2f}x |"
                )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
