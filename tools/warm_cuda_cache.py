#!/usr/bin/env python
"""Compile the involution CUDA kernels into CuPy's on-disk cache, many at a time.

Every instantiation (source, dtype, K, stride, dilation) is one NVRTC compile of a few seconds the
first time a shape needs it; a test run or a benchmark on a fresh machine needs dozens. This
compiles a grid of them in parallel processes, each with the code and options cuda_kernel.py uses,
so the kernels later load from the cache. Needs a CUDA device (CuPy compiles for its arch).

Example::

    python tools/warm_cuda_cache.py --workers 16 --kernel-sizes 1 3 5 7 --strides 1 2 3
"""

import argparse
import itertools
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import List, Optional, Tuple

DTYPES = ("float16", "bfloat16", "float32", "float64")
SOURCES = ("involution_cuda.cu", "involution_fused.cu")


def compile_one(job: Tuple[str, str, Optional[int], int, int]) -> str:
    """Compile one instantiation (geometry None: the naive kernels); returns a report line."""
    import cupy
    import torch

    from d2_involution.ops import cuda_kernel

    source, dtype, K, S, D = job
    options = cuda_kernel.nvrtc_options(getattr(torch, dtype), K, S, D)
    code = cuda_kernel.kernel_source(cuda_kernel.SOURCE_DIR / source)
    t0 = time.perf_counter()
    cupy.RawModule(code=code, options=options).compile()
    return f"{source} {dtype} K={K} S={S} D={D}: {time.perf_counter() - t0:.1f} s"


def jobs(args) -> List[Tuple[str, str, Optional[int], int, int]]:
    naive = [("involution_naive.cu", dtype, None, 1, 1) for dtype in args.dtypes]
    tiled = itertools.product(SOURCES, args.dtypes, args.kernel_sizes, args.strides, args.dilations)
    # K = 1 has no dilation to speak of; one dilation suffices for it.
    return naive + [(s, d, K, S, D) for s, d, K, S, D in tiled if K > 1 or D == 1]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--kernel-sizes", nargs="+", type=int, default=[1, 3, 5, 7])
    parser.add_argument("--strides", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--dilations", nargs="+", type=int, default=[1, 2])
    args = parser.parse_args(argv)
    todo = jobs(args)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        for line in pool.map(compile_one, todo):
            print(line)
            sys.stdout.flush()
    print(f"{len(todo)} instantiations in {time.perf_counter() - t0:.0f} s, {args.workers} workers")


if __name__ == "__main__":
    main()
