"""The static budget of the tiled CUDA kernels (issue 12), read from their sm_90 code without a
GPU: the K = 7, stride 1 instantiations in every dtype, NVRTC -> PTX -> ``ptxas -arch=sm_90 -v``
-> ``cuobjdump -sass``.

* SASS instructions per multiply-add in the steady-state loop: of the innermost loops (address
  ranges of backward branches with no other loop inside) the one with the most multiply-adds;
  its instructions, NOPs excluded, over its FFMA/DFMA count. Budget: forward <= 2.0,
  grad-input and grad-weight <= 3.0. The fused kernels' steady state is their weight generation;
  their ceilings (2.5 / 4.0) are this project's regression guards, not the issue's.
* No spills (ptxas), in every kernel.
* >= 16 warps an SM, from the kernel's registers (allocated per warp in units of 256, per
  sub-partition of 16384, as CUDA's occupancy calculator does) and its dynamic shared memory (the
  launch configuration it exports; 128-byte granularity plus 1 KB reserved a block, 228 KB an SM).
"""

import re
import struct

import pytest
import torch

from d2_involution.ops import cuda_kernel

# tests/ is on sys.path
from nvrtc_build import (  # isort: skip
    assemble_and_disassemble,
    compile_ptx,
    find_tool,
    needs_nvrtc,
    ptxas_report,
)

TOOLS = {name: find_tool(name) for name in ("ptxas", "cuobjdump")}
needs_tools = pytest.mark.skipif(
    not all(TOOLS.values()), reason=f"ptxas / cuobjdump not found: {TOOLS}"
)
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# kernel name prefix: instructions per multiply-add allowed in its steady-state loop.
BUDGET = {
    "involution_forward_": 2.0,
    "involution_grad_input_": 3.0,
    "involution_grad_weight_": 3.0,
    "involution_fused_forward_": 2.5,
    "involution_fused_grad_input_": 4.0,
}
FMAS = {"FFMA": 1, "DFMA": 1, "HFMA2": 2, "FFMA2": 2}
INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BACKWARD_BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+(?:`\()?(0x[0-9a-f]+)")
CONFIG = re.compile(r"\.b8 (\w+)_config\[24\] = \{([0-9, ]+)\}")


def opcode(text: str) -> str:
    words = text.split()
    words = words[1:] if words and words[0].startswith("@") else words
    return words[0].split(".")[0] if words else ""


def steady_state(listing: str):
    """(instructions, multiply-adds) of the innermost loop with the most multiply-adds."""
    code = [
        (int(m.group(1), 16), m.group(2)) for m in map(INSTRUCTION.match, listing.splitlines()) if m
    ]
    loops = [
        (int(b.group(1), 16), at)
        for at, text in code
        for b in [BACKWARD_BRANCH.search(text)]
        if b and int(b.group(1), 16) < at
    ]
    best = (0, 0)
    for lo, hi in loops:
        if any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in loops):
            continue  # not innermost
        body = [text for at, text in code if lo <= at <= hi and opcode(text) != "NOP"]
        fmas = sum(FMAS.get(opcode(text), 0) for text in body)
        best = max(best, (len(body), fmas), key=lambda c: c[1])
    return best


def warps_per_sm(registers: int, smem: int, threads: int) -> int:
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = (16384 // per_warp) * 4 // warps
    by_smem = 233472 // (-(-smem // 128) * 128 + 1024)
    return min(32, by_registers, by_smem, 64 // warps) * warps


def kernel_stats(source, dtype):
    """{kernel: (instructions/FMA, loop instructions, FMAs, spill bytes, registers, warps/SM)}."""
    ptx = compile_ptx(source, cuda_kernel.nvrtc_options(dtype, 7, 1, 1))
    log, sass = assemble_and_disassemble(ptx)
    report = ptxas_report(log)
    configs = {}
    for name, values in CONFIG.findall(ptx):
        raw = bytes(int(v) for v in values.split(",")).ljust(24, b"\0")
        configs[name] = struct.unpack("<6i", raw)
    stats = {}
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name = block.split()[0]
        instructions, fmas = steady_state(block)
        registers, spills = report[name]
        threads, smem = configs[name][0], configs[name][4]
        assert smem > 0, f"{name}: the tile does not fit"
        stats[name] = (
            instructions / fmas,
            instructions,
            fmas,
            spills,
            registers,
            warps_per_sm(registers, smem, threads),
        )
    return stats


@needs_nvrtc
@needs_tools
@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d)[6:] for d in DTYPES])
def test_k7_kernels_meet_the_static_budget(dtype):
    for source in (cuda_kernel.FAST_SOURCE, cuda_kernel.FUSED_SOURCE):
        stats = kernel_stats(source, dtype)
        assert len(stats) == (8 if source == cuda_kernel.FAST_SOURCE else 4), sorted(stats)
        for name, (ratio, instructions, fmas, spills, registers, warps) in stats.items():
            line = (
                f"{name} {str(dtype)[6:]} K=7 instr/fma {ratio:.2f} ({instructions}/{fmas}) "
                f"spills {spills} regs {registers} warps/SM {warps}"
            )
            print(line)
            budget = next(v for prefix, v in BUDGET.items() if name.startswith(prefix))
            assert fmas > 0 and ratio <= budget, line
            assert spills == 0, line
            assert warps >= 16, line
