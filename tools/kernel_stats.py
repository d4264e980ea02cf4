#!/usr/bin/env python
"""Static statistics of every involution CUDA kernel, without a GPU.

Every ``extern "C" __global__`` kernel of every ``d2_involution/ops/*.cu`` file is compiled for
``--arch`` with NVRTC (through CuPy) to PTX, assembled with ``ptxas -v`` (registers, spills, static
shared memory) and disassembled with ``cuobjdump -sass``. One line per kernel and dtype:

    KERNEL DTYPE K=7 instr/fma X spills N regs R warps/SM W

* ``instr/fma``: SASS instructions per multiply-add in the steady-state loop. The loops are the
  address ranges [target, branch] of backward branches (``BRA`` to a lower address); of the
  innermost ones (no other loop inside) the one with the most multiply-adds is the steady state.
  Its instructions (``NOP`` excluded) are divided by its multiply-adds: ``FFMA``/``DFMA``/
  ``HFMA`` count 1, the packed ``HFMA2``/``FFMA2`` (two lanes) 2. A kernel without such a loop is
  measured over its whole body.
* ``spills``: spill-store plus spill-load bytes reported by ptxas.
* ``warps/SM``: the warps one SM can hold with these registers and this static shared memory for
  the kernel's block size (``.maxntid`` in the PTX, else 256 threads), by the architecture's
  register file, register allocation granularity, shared memory, warp and block limits.

Each file is compiled with the macros its ``#if defined(D2I_...)`` guard needs: ``D2I_T`` (the
dtype's C type), ``D2I_K`` (``--kernel-size``), ``D2I_S`` (``--stride``); a file that needs another
macro is an error that names it.

Example::

    python tools/kernel_stats.py --arch sm_90 --kernel-size 7
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIR = REPO / "d2_involution" / "ops"
DTYPES = {"float16": "d2i_half", "bfloat16": "d2i_bf16", "float32": "float", "float64": "double"}
KERNEL_RE = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\('
)
GUARD_RE = re.compile(r"defined\((D2I_\w+)\)")
INSTR_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH_RE = re.compile(r"\bBRA(?:\.\w+)*\s+(?:`\()?(0x[0-9a-f]+)")
# Multiply-adds per instruction (opcode without predicate and modifiers).
FMA_WEIGHTS = {"FFMA": 1, "DFMA": 1, "HFMA": 1, "HFMA2": 2, "FFMA2": 2}
# Per SM: max warps, 32-bit registers, shared memory (bytes) and resident blocks; shared memory
# reserved per block by the runtime.
ARCHS = {
    "sm_80": (64, 65536, 167936, 32),
    "sm_86": (48, 65536, 102400, 16),
    "sm_89": (48, 65536, 102400, 24),
    "sm_90": (64, 65536, 233472, 32),
    "sm_100": (64, 65536, 233472, 32),
}
SMEM_RESERVED_PER_BLOCK = 1024
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)
DEFAULT_BLOCK = 256


@dataclass
class KernelStats:
    """One kernel in one dtype."""

    kernel: str
    source: str
    dtype: str
    kernel_size: int
    instr_per_fma: float
    loop_instructions: int
    loop_fmas: int
    spill_bytes: int
    registers: int
    smem_bytes: int
    block: int
    warps_per_sm: int

    def line(self) -> str:
        return (
            f"{self.kernel} {self.dtype} K={self.kernel_size} instr/fma {self.instr_per_fma:.2f} "
            f"spills {self.spill_bytes} regs {self.registers} warps/SM {self.warps_per_sm}"
        )


# ---------------------------------------------------------------------------------------------
# Tools


def find_tool(name: str, explicit: Optional[str] = None) -> str:
    """``explicit``, else ``name`` on PATH, in /usr/local/cuda/bin or in the triton package."""
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


def nvrtc_ptx(source: Path, options: Sequence[str]) -> str:
    """PTX of ``source`` compiled by NVRTC (CuPy's binding; no GPU needed)."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source.read_text(), source.name, [], [])
    try:
        nvrtc.compileProgram(prog, list(options))
    except Exception as e:  # noqa: BLE001 - report NVRTC's log with the error
        raise RuntimeError(
            f"NVRTC failed on {source.name} {options}:\n{nvrtc.getProgramLog(prog)}"
        ) from e
    ptx = nvrtc.getPTX(prog)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


# ---------------------------------------------------------------------------------------------
# Sources


def discover(source_dir: Path = SOURCE_DIR) -> List[Tuple[Path, List[str], List[str]]]:
    """(file, kernel names, guard macros) of every .cu file that defines kernels."""
    found = []
    for path in sorted(source_dir.glob("*.cu")):
        text = path.read_text()
        names = KERNEL_RE.findall(text)
        if names:
            found.append((path, names, sorted(set(GUARD_RE.findall(text)))))
    return found


def macro_options(macros: Sequence[str], dtype: str, kernel_size: int, stride: int) -> List[str]:
    values = {"D2I_T": DTYPES[dtype], "D2I_K": kernel_size, "D2I_S": stride}
    unknown = [m for m in macros if m not in values]
    if unknown:
        raise ValueError(
            f"kernel_stats: the guard needs {unknown}; known macros: {sorted(values)} "
            "(extend macro_options)"
        )
    return [f"-D{m}={values[m]}" for m in macros]


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


def ptx_block_sizes(ptx: str) -> Dict[str, int]:
    """{kernel: threads per block} from the ``.maxntid``/``.reqntid`` of each PTX entry."""
    sizes = {}
    for chunk in ptx.split(".entry ")[1:]:
        name = re.match(r"\s*(\w+)", chunk).group(1)
        m = re.search(
            r"\.(?:maxntid|reqntid)\s+(\d+)(?:,\s*(\d+))?(?:,\s*(\d+))?", chunk.split("{")[0]
        )
        if m:
            sizes[name] = int(m.group(1)) * int(m.group(2) or 1) * int(m.group(3) or 1)
    return sizes


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
    return sum(FMA_WEIGHTS.get(opcode(text), 0) for _, text in instructions)


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


def warps_per_sm(arch: str, registers: int, smem_bytes: int, block: int) -> int:
    """Resident warps per SM allowed by registers, shared memory and the block limits."""
    max_warps, regfile, smem, max_blocks = ARCHS[arch]
    warps_per_block = -(-block // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // REGISTER_UNIT) * REGISTER_UNIT
    blocks = min(
        max_blocks, (regfile // regs_per_warp) // warps_per_block, max_warps // warps_per_block
    )
    blocks = min(blocks, smem // (smem_bytes + SMEM_RESERVED_PER_BLOCK))
    return blocks * warps_per_block


# ---------------------------------------------------------------------------------------------
# Collection


def collect(
    arch: str = "sm_90",
    kernel_size: int = 7,
    stride: int = 1,
    dtypes: Sequence[str] = tuple(DTYPES),
    ptxas: Optional[str] = None,
    cuobjdump: Optional[str] = None,
    source_dir: Path = SOURCE_DIR,
) -> List[KernelStats]:
    """Statistics of every kernel of every .cu file in ``source_dir`` for every dtype."""
    if arch not in ARCHS:
        raise ValueError(f"kernel_stats: arch must be one of {sorted(ARCHS)}, got {arch!r}")
    ptxas, cuobjdump = find_tool("ptxas", ptxas), find_tool("cuobjdump", cuobjdump)
    results = []
    with tempfile.TemporaryDirectory(prefix="kernel_stats_") as tmp:
        for source, names, macros in discover(source_dir):
            for dtype in dtypes:
                options = [
                    "--std=c++14",
                    f"-I{source_dir}",
                    f"--gpu-architecture=compute_{arch[3:]}",
                ]
                options += macro_options(macros, dtype, kernel_size, stride)
                ptx = nvrtc_ptx(source, options)
                ptx_file, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
                ptx_file.write_text(ptx)
                log = subprocess.run(
                    [ptxas, f"-arch={arch}", "-v", str(ptx_file), "-o", str(cubin)],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stderr
                info, blocks = parse_ptxas(log), ptx_block_sizes(ptx)
                for name in names:
                    sass = subprocess.run(
                        [cuobjdump, "-sass", "-fun", name, str(cubin)],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                    n_instr, n_fma = steady_state_loop(parse_sass(sass))
                    regs, spills, smem = (
                        info[name][k] for k in ("registers", "spill_bytes", "smem_bytes")
                    )
                    block = blocks.get(name, DEFAULT_BLOCK)
                    results.append(
                        KernelStats(
                            kernel=name,
                            source=source.name,
                            dtype=dtype,
                            kernel_size=kernel_size,
                            instr_per_fma=n_instr / n_fma if n_fma else float("inf"),
                            loop_instructions=n_instr,
                            loop_fmas=n_fma,
                            spill_bytes=spills,
                            registers=regs,
                            smem_bytes=smem,
                            block=block,
                            warps_per_sm=warps_per_sm(arch, regs, smem, block),
                        )
                    )
    return results


def main(argv: Optional[Sequence[str]] = None) -> List[KernelStats]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90", choices=sorted(ARCHS))
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--ptxas", default=None, help="ptxas binary (default: found)")
    parser.add_argument("--cuobjdump", default=None, help="cuobjdump binary (default: found)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead")
    args = parser.parse_args(argv)
    results = collect(
        args.arch, args.kernel_size, args.stride, args.dtypes, args.ptxas, args.cuobjdump
    )
    for r in results:
        print(json.dumps(asdict(r)) if args.json else r.line())
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
