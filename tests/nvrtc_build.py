"""Compiling the CUDA kernels without a GPU, for the tests that read what the compiler made of
them: NVRTC (CuPy's binding) to a cubin with ptxas's report, or to PTX for a separate ptxas and
cuobjdump. Every compile is cached for the test session (the same instantiation serves several
tests)."""

import functools
import os
import re
import shutil
import subprocess
import tempfile
from importlib.util import find_spec
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import pytest

from d2_involution.ops import cuda_kernel


def _nvrtc_or_reason():
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001 - any failure to load NVRTC means: skip
        return None, f"NVRTC is not loadable here ({type(e).__name__}: {e})"
    try:
        archs = set(nvrtc.getSupportedArchs())
    except Exception:  # noqa: BLE001 - old NVRTC without the query: try compiling anyway
        archs = {80, 90}
    missing = {80, 90} - archs
    if missing:
        return None, f"this NVRTC cannot target sm_{sorted(missing)}"
    return nvrtc, None


NVRTC, NVRTC_REASON = _nvrtc_or_reason()
needs_nvrtc = pytest.mark.skipif(NVRTC is None, reason=f"NVRTC unavailable: {NVRTC_REASON}")

PTXAS_ENTRY = re.compile(
    r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores, (\d+) bytes spill loads.*?"
    r"Used (\d+) registers",
    re.S,
)


def ptxas_report(log: str) -> Dict[str, Tuple[int, int]]:
    """{kernel: (registers, spill bytes)} from ``ptxas -v`` output."""
    return {
        name: (int(regs), int(stores) + int(loads))
        for name, stores, loads, regs in PTXAS_ENTRY.findall(log)
    }


def _compile(source: Path, options: Sequence[str]):
    prog = NVRTC.createProgram(cuda_kernel.kernel_source(source), source.name, [], [])
    try:
        try:
            NVRTC.compileProgram(prog, list(options))
        except NVRTC.NVRTCError as e:
            raise AssertionError(f"{source.name} {options}:\n{NVRTC.getProgramLog(prog)}") from e
        return prog, NVRTC.getProgramLog(prog)
    except BaseException:
        NVRTC.destroyProgram(prog)
        raise


@functools.lru_cache(maxsize=None)
def compile_cubin(source: Path, options: Tuple[str, ...], arch: int):
    """The code cuda_kernel.py hands to NVRTC (headers inlined, no include path) as a cubin for
    sm_<arch>, through ptxas; returns (cubin bytes, {kernel: (registers, spill bytes)})."""
    prog, log = _compile(source, [*options, f"-arch=sm_{arch}", "--ptxas-options=-v"])
    try:
        return NVRTC.getCUBIN(prog), ptxas_report(log)
    finally:
        NVRTC.destroyProgram(prog)


@functools.lru_cache(maxsize=None)
def compile_ptx(source: Path, options: Tuple[str, ...], arch: int = 90) -> str:
    """The same code as PTX for compute_<arch> (for a separate ptxas and cuobjdump)."""
    prog, _ = _compile(source, [*options, f"-arch=compute_{arch}"])
    try:
        ptx = NVRTC.getPTX(prog)
        return ptx.decode() if isinstance(ptx, bytes) else ptx
    finally:
        NVRTC.destroyProgram(prog)


def find_tool(name: str) -> Optional[str]:
    """``name`` from the CUDA toolkit (PATH, /usr/local/cuda/bin) or, for cuobjdump, the copy in
    the triton package (a toolkit without it is common)."""
    candidates = [shutil.which(name), f"/usr/local/cuda/bin/{name}"]
    spec = find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0])
        candidates.append(str(root / "backends" / "nvidia" / "bin" / name))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def assemble_and_disassemble(ptx: str, arch: int = 90) -> Tuple[str, str]:
    """(``ptxas -v`` log, ``cuobjdump -sass`` listing) of PTX; needs both tools."""
    ptxas, cuobjdump = find_tool("ptxas"), find_tool("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "kernels.ptx", Path(tmp) / "kernels.cubin"
        src.write_text(ptx)
        cmd = [ptxas, f"-arch=sm_{arch}", "-v", str(src), "-o", str(cubin)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True)
        assert sass.returncode == 0, sass.stderr[-2000:]
        return proc.stderr + proc.stdout, sass.stdout
