#!/usr/bin/env python
"""Static statistics of the involution CUDA kernels as cuda_kernel.py builds them, without a GPU.

Every module ``d2_involution/ops/cuda_kernel.py`` compiles is compiled here the same way: the code
of :func:`cuda_kernel.kernel_source` (headers inlined) with the options of
:func:`cuda_kernel.nvrtc_options` (plus the two CuPy adds, ``CUPY_OPTIONS``) for the tiled sources
(one per op, as the host picks them) at ``--kernel-size``/``--stride``/``--dilation``, and the
naive baseline's source in its own options. NVRTC (CuPy's binding) makes the PTX, ``ptxas -v``
assembles it for ``--arch`` (registers, spills) and ``cuobjdump -sass`` disassembles it. Every
kernel of every module (forward, grad-input, grad-weight and its fp32-accumulator variant, fused
forward and grad-input, NCHW and NHWC; the naive ones) in every dtype gives one line:

    KERNEL DTYPE K=7 instr/fma X spills N regs R warps/SM W [baseline] [not-launched]

* ``instr/fma``: SASS instructions per multiply-add in the steady-state loop. The loops are the
  address ranges [target, branch] of backward branches (``BRA`` to a lower address); of the
  innermost ones (no other loop inside) the one with the most multiply-adds is the steady state.
  Its instructions (``NOP`` excluded) are divided by its multiply-adds: ``FFMA``/``DFMA``/
  ``HFMA`` count 1, the packed ``HFMA2``/``FFMA2`` (two lanes) 2, one with the zero register as a
  factor (ptxas's constant load ``HFMA2.MMA R1, -RZ, RZ, 0, 0``) 0. A kernel without such a loop
  is measured over its whole body.
* ``spills``: spill-store plus spill-load bytes reported by ptxas.
* ``warps/SM``: the warps one SM holds with these registers (allocated per warp in units of 256,
  each warp in one of 4 register-file sub-partitions) and the block's shared memory (the dynamic
  size the kernel exports in ``<kernel>_config`` plus ptxas's static size, in units of 128 bytes
  plus 1 KB reserved a block) for the block the host launches (the exported thread count; the
  naive kernels: ``cuda_kernel._NAIVE_BLOCK``), within the warp and block limits of the arch.
* ``baseline``: a naive kernel (one thread per output; NCHW; K is a run-time argument, so one
  compile serves every K).
* ``not-launched``: the host would not run this tiled kernel at this K (``FAST_MAX_K``, spills, a
  tile that does not fit, no block an SM), the naive kernel (fused: the unfused ops) runs instead.

Example::

    python tools/kernel_stats.py --arch sm_90 --kernel-size 7
"""

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from d2_involution.ops import cuda_kernel

DTYPES = {str(dtype).split(".")[-1]: dtype for dtype in cuda_kernel.CTYPES}
# Options CuPy's RawModule adds to the given ones for NVRTC (cupy/cuda/compiler.py), besides the
# target (-arch) that is given here.
CUPY_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")
INSTR_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH_RE = re.compile(r"\bBRA(?:\.\w+)*\s+(?:`\()?(0x[0-9a-f]+)")
CONFIG_RE = re.compile(r"\.b8 (\w+)_config\[24\] = \{([0-9, ]+)\}")
# Multiply-adds per instruction (opcode without predicate and modifiers).
FMA_WEIGHTS = {"FFMA": 1, "DFMA": 1, "HFMA": 1, "HFMA2": 2, "FFMA2": 2}
# Per SM: max warps, 32-bit registers, shared memory (bytes) and resident blocks.
ARCHS = {
    "sm_80": (64, 65536, 167936, 32),
    "sm_86": (48, 65536, 102400, 16),
    "sm_89": (48, 65536, 102400, 24),
    "sm_90": (64, 65536, 233472, 32),
    "sm_100": (64, 65536, 233472, 32),
}
SUB_PARTITIONS = 4  # register-file sub-partitions an SM; a warp's registers live in one
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)
SMEM_UNIT = 128  # shared memory is allocated per block in units of 128 bytes
SMEM_RESERVED_PER_BLOCK = 1024  # shared memory the runtime reserves per block


@dataclass
class KernelStats:
    """One kernel in one dtype."""

    kernel: str
    source: str
    op: str
    dtype: str
    kernel_size: int
    stride: int
    instr_per_fma: float
    loop_instructions: int
    loop_fmas: int
    spill_bytes: int
    registers: int
    smem_bytes: int
    threads: int
    warps_per_sm: int
    baseline: bool
    launched: bool

    def line(self) -> str:
        flags = (" baseline" if self.baseline else "") + ("" if self.launched else " not-launched")
        return (
            f"{self.kernel} {self.dtype} K={self.kernel_size} instr/fma {self.instr_per_fma:.2f} "
            f"spills {self.spill_bytes} regs {self.registers} warps/SM {self.warps_per_sm}{flags}"
        )


class Assembled(NamedTuple):
    """One module compiled for one arch."""

    ptxas: Dict[str, Dict[str, int]]  # {kernel: {registers, spill_bytes, smem_bytes}}
    configs: Dict[str, Tuple[int, ...]]  # {tiled kernel: its exported launch configuration}
    sass: Dict[str, str]  # {kernel: its cuobjdump -sass listing}


# ---------------------------------------------------------------------------------------------
# Tools and compilation


def find_tool(name: str, explicit: Optional[str] = None) -> str:
    """``explicit``, else ``name`` on PATH, in /usr/local/cuda/bin or in the triton package (a
    toolkit without cuobjdump is common)."""
    candidates = [explicit] if explicit else []
    candidates += [shutil.which(name), f"/usr/local/cuda/bin/{name}"]
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name))
    except ImportError:
        pass
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(f"kernel_stats: {name} not found (pass --{name} PATH)")


def missing_tools(arch: str = "sm_90") -> str:
    """Why this machine cannot compile for ``arch`` (NVRTC, ptxas, cuobjdump), or ''."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        supported = getattr(nvrtc, "getSupportedArchs", None)
        if supported is not None and int(arch[3:]) not in supported():
            return f"this NVRTC cannot target {arch}"
        find_tool("ptxas")
        find_tool("cuobjdump")
    except Exception as e:  # noqa: BLE001 - any missing piece is the reason
        return f"{type(e).__name__}: {e}"
    return ""


@functools.lru_cache(maxsize=None)
def nvrtc_ptx(source: Path, options: Tuple[str, ...], arch: str = "sm_90") -> str:
    """PTX of the code cuda_kernel.py hands NVRTC for ``source`` with ``options`` (and CuPy's
    additions) for compute_<arch>; cached per process."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(cuda_kernel.kernel_source(source), source.name, [], [])
    try:
        all_options = [*options, *CUPY_OPTIONS, f"--gpu-architecture=compute_{arch[3:]}"]
        try:
            nvrtc.compileProgram(prog, all_options)
        except Exception as e:  # noqa: BLE001 - report NVRTC's log with the error
            log = nvrtc.getProgramLog(prog)
            raise RuntimeError(f"NVRTC failed on {source.name} {all_options}:\n{log}") from e
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return (ptx.decode() if isinstance(ptx, bytes) else ptx).rstrip("\0")


@functools.lru_cache(maxsize=None)
def assemble(
    source: Path,
    options: Tuple[str, ...],
    arch: str = "sm_90",
    ptxas: Optional[str] = None,
    cuobjdump: Optional[str] = None,
) -> Assembled:
    """One module (``source`` compiled with ``options``) through ptxas -v and cuobjdump -sass;
    cached per process."""
    ptx = nvrtc_ptx(source, options, arch)
    with tempfile.TemporaryDirectory(prefix="kernel_stats_") as tmp:
        ptx_file, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx_file.write_text(ptx)
        cmd = [find_tool("ptxas", ptxas), f"-arch={arch}", "-v", str(ptx_file), "-o", str(cubin)]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        listing = subprocess.run(
            [find_tool("cuobjdump", cuobjdump), "-sass", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return Assembled(parse_ptxas(log), launch_configs(ptx), split_sass(listing))


def modules(
    dtype: torch.dtype, kernel_size: int, stride: int = 1, dilation: int = 1
) -> List[Tuple[Path, Tuple[str, ...]]]:
    """(source, NVRTC options) of every module the host builds for this dtype and geometry: the
    tiled sources of its ops (``cuda_kernel._SOURCE_OF``) and the naive baseline."""
    tiled = {
        cuda_kernel._SOURCE_OF.get(op, cuda_kernel.FAST_SOURCE) for op in cuda_kernel.FAST_MAX_K
    }
    options = cuda_kernel.nvrtc_options(dtype, kernel_size, stride, dilation)
    found = [(source, options) for source in sorted(tiled)]
    return found + [(cuda_kernel.NAIVE_SOURCE, cuda_kernel.nvrtc_options(dtype))]


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_ptxas(log: str) -> Dict[str, Dict[str, int]]:
    """{kernel: {registers, spill_bytes, smem_bytes}} from ``ptxas -v`` output."""
    stats: Dict[str, Dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\w+)", line) or re.search(
            r"Compiling entry function '(\w+)'", line
        )
        if m:
            current = stats.setdefault(
                m.group(1), {"registers": 0, "spill_bytes": 0, "smem_bytes": 0}
            )
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            current["smem_bytes"] = int(m.group(1))
    return stats


def launch_configs(ptx: str) -> Dict[str, Tuple[int, ...]]:
    """{kernel: (threads, tile rows, tile cols, chunks, dynamic smem, channels)} from the
    ``<kernel>_config`` constants the tiled kernels export (the host reads the same)."""
    configs = {}
    for name, values in CONFIG_RE.findall(ptx):
        raw = bytes(int(v) for v in values.split(",")).ljust(24, b"\0")
        configs[name] = tuple(
            int.from_bytes(raw[i : i + 4], "little", signed=True) for i in range(0, 24, 4)
        )
    return configs


def split_sass(listing: str) -> Dict[str, str]:
    """{kernel: its part of a whole-cubin ``cuobjdump -sass`` listing}."""
    parts = re.split(r"\n\s*Function : ", listing)[1:]
    return {part.split()[0]: part for part in parts}


def parse_sass(text: str) -> List[Tuple[int, str]]:
    """(address, instruction text) of one function's ``cuobjdump -sass`` listing."""
    return [(int(m.group(1), 16), m.group(2)) for m in map(INSTR_RE.match, text.splitlines()) if m]


def opcode(instruction: str) -> str:
    """The opcode without predicate and modifiers: '@!P0 HFMA2.MMA R1, ...' -> 'HFMA2'."""
    words = instruction.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def fma_count(instructions: Sequence[Tuple[int, str]]) -> int:
    """Multiply-adds of ``instructions``; an FMA with RZ as a factor (``HFMA2.MMA R1, -RZ, RZ,
    0, 0``, ptxas's idiom for loading a constant) multiplies nothing and counts 0."""
    return sum(
        FMA_WEIGHTS.get(opcode(text), 0) * (not _has_zero_factor(text)) for _, text in instructions
    )


def _has_zero_factor(instruction: str) -> bool:
    """Whether one of an FMA's two factors (its second and third operands) is the zero register."""
    if instruction.startswith("@"):
        instruction = instruction.split(None, 1)[1]
    operands = instruction.split(None, 1)[1].split(",") if " " in instruction else []
    return "RZ" in [o.strip().lstrip("-|") for o in operands[1:3]]


def steady_state_loop(instructions: Sequence[Tuple[int, str]]) -> Tuple[int, int]:
    """(instructions, multiply-adds) of the innermost loop with the most multiply-adds (the whole
    body when there is no loop with any). NOPs are not counted."""
    loops = []
    for address, text in instructions:
        m = BRANCH_RE.search(text)
        if m and int(m.group(1), 16) < address:
            loops.append((int(m.group(1), 16), address))
    innermost = [
        (a, b)
        for a, b in loops
        if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)
    ]
    best: Optional[Tuple[int, int]] = None
    for a, b in innermost:
        body = [(addr, t) for addr, t in instructions if a <= addr <= b and opcode(t) != "NOP"]
        candidate = (len(body), fma_count(body))
        if candidate[1] > 0 and (best is None or candidate[1] > best[1]):
            best = candidate
    if best is None:
        body = [(addr, t) for addr, t in instructions if opcode(t) != "NOP"]
        best = (len(body), fma_count(body))
    return best


def warps_per_sm(arch: str, registers: int, smem_bytes: int, threads: int) -> int:
    """Resident warps per SM allowed by registers, shared memory and the block limits."""
    max_warps, regfile, smem, max_blocks = ARCHS[arch]
    warps_per_block = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // REGISTER_UNIT) * REGISTER_UNIT
    warps_by_registers = SUB_PARTITIONS * ((regfile // SUB_PARTITIONS) // regs_per_warp)
    smem_per_block = -(-smem_bytes // SMEM_UNIT) * SMEM_UNIT + SMEM_RESERVED_PER_BLOCK
    blocks = min(
        max_blocks,
        warps_by_registers // warps_per_block,
        max_warps // warps_per_block,
        smem // smem_per_block,
    )
    return blocks * warps_per_block


def op_of(kernel: str) -> str:
    """The host op that launches ``kernel``: the cuda_kernel.FAST_MAX_K op whose kernels
    (``involution_<op>[_acc]_<layout>``) it belongs to, else its name without "involution_"."""
    ops = [op for op in cuda_kernel.FAST_MAX_K if kernel.startswith(f"involution_{op}_")]
    return max(ops, key=len) if ops else kernel.replace("involution_", "", 1)


# ---------------------------------------------------------------------------------------------
# Collection


def kernel_stats(
    name: str, source: Path, module: Assembled, arch: str, dtype: str, K: int, stride: int
) -> KernelStats:
    """The statistics of kernel ``name`` of an assembled module."""
    n_instr, n_fma = steady_state_loop(parse_sass(module.sass[name]))
    info = module.ptxas[name]
    config = module.configs.get(name)
    baseline = source == cuda_kernel.NAIVE_SOURCE
    threads = config[0] if config else cuda_kernel._NAIVE_BLOCK
    dynamic_smem = config[4] if config else 0
    warps = warps_per_sm(arch, info["registers"], info["smem_bytes"] + dynamic_smem, threads)
    op = op_of(name)
    launched = baseline or (
        cuda_kernel.uses_fast_kernel(op, DTYPES[dtype], K)
        and info["spill_bytes"] == 0
        and dynamic_smem > 0
        and warps > 0
    )
    return KernelStats(
        kernel=name,
        source=source.name,
        op=op,
        dtype=dtype,
        kernel_size=K,
        stride=stride,
        instr_per_fma=n_instr / n_fma if n_fma else float("inf"),
        loop_instructions=n_instr,
        loop_fmas=n_fma,
        spill_bytes=info["spill_bytes"],
        registers=info["registers"],
        smem_bytes=info["smem_bytes"] + dynamic_smem,
        threads=threads,
        warps_per_sm=warps,
        baseline=baseline,
        launched=launched,
    )


def collect(
    arch: str = "sm_90",
    kernel_size: int = 7,
    stride: int = 1,
    dilation: int = 1,
    dtypes: Sequence[str] = tuple(DTYPES),
    ptxas: Optional[str] = None,
    cuobjdump: Optional[str] = None,
) -> List[KernelStats]:
    """Statistics of every kernel of every module the host builds, for every dtype."""
    if arch not in ARCHS:
        raise ValueError(f"kernel_stats: arch must be one of {sorted(ARCHS)}, got {arch!r}")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"kernel_stats: dtypes must be among {list(DTYPES)}, got {unknown}")
    results = []
    for dtype in dtypes:
        for source, options in modules(DTYPES[dtype], kernel_size, stride, dilation):
            module = assemble(source, options, arch, ptxas, cuobjdump)
            for name in sorted(module.sass):
                results.append(kernel_stats(name, source, module, arch, dtype, kernel_size, stride))
    return results


def main(argv: Optional[Sequence[str]] = None) -> List[KernelStats]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90", choices=sorted(ARCHS))
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--dilation", type=int, default=1)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--ptxas", default=None, help="ptxas binary (default: found)")
    parser.add_argument("--cuobjdump", default=None, help="cuobjdump binary (default: found)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead")
    args = parser.parse_args(argv)
    results = collect(
        args.arch,
        args.kernel_size,
        args.stride,
        args.dilation,
        args.dtypes,
        args.ptxas,
        args.cuobjdump,
    )
    for r in results:
        print(json.dumps(asdict(r)) if args.json else r.line())
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
