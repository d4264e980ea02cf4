"""tools/kernel_stats.py: static SASS statistics of every CUDA kernel (NVRTC + ptxas + cuobjdump,
no GPU) and the issue-12 budget for the fast kernels at K = 7 on sm_90.

The budget (forward <= 2.0 SASS instructions per multiply-add in the steady-state loop,
grad-input and grad-weight <= 3.0, no spills, >= 16 resident warps per SM) is not met by the
current kernels: those (kernel, dtype) pairs are xfail(strict=True) with the measured values, so
a kernel that starts meeting the budget fails here until its entry in CURRENT_MISSES is removed.
"""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "d2inv_kernel_stats", REPO / "tools" / "kernel_stats.py"
)
kernel_stats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_stats)

DTYPES = ("float16", "bfloat16", "float32", "float64")
BUDGET = {"forward": 2.0, "grad_input": 3.0, "grad_weight": 3.0}
MIN_WARPS = 16
# Measured with tools/kernel_stats.py --arch sm_90 --kernel-size 7 (docs/benchmarks.md).
CURRENT_MISSES = {
    ("involution_forward", "float16"): "10.65 instr/fma",
    ("involution_forward", "bfloat16"): "10.76 instr/fma",
    ("involution_forward", "float32"): "9.59 instr/fma",
    ("involution_forward", "float64"): "9.51 instr/fma, 12 warps/SM",
    ("involution_grad_input", "float16"): "6.76 instr/fma, 8 warps/SM (186 regs)",
    ("involution_grad_input", "bfloat16"): "6.88 instr/fma, 8 warps/SM (186 regs)",
    ("involution_grad_input", "float32"): "5.69 instr/fma, 8 warps/SM (188 regs)",
    ("involution_grad_input", "float64"): "5.73 instr/fma, 8 warps/SM (233 regs)",
    ("involution_grad_weight", "float16"): "10.02 instr/fma",
    ("involution_grad_weight", "bfloat16"): "10.02 instr/fma",
    ("involution_grad_weight", "float32"): "9.00 instr/fma",
    ("involution_grad_weight", "float64"): "9.00 instr/fma, 12 warps/SM",
}


def _tools_missing() -> str:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        kernel_stats.find_tool("ptxas")
        kernel_stats.find_tool("cuobjdump")
    except Exception as e:  # noqa: BLE001 - any missing piece: skip with the reason
        return f"{type(e).__name__}: {e}"
    return ""


MISSING = _tools_missing()
needs_tools = pytest.mark.skipif(bool(MISSING), reason=f"NVRTC/ptxas/cuobjdump: {MISSING}")


@pytest.fixture(scope="module")
def stats():
    return {(s.kernel, s.dtype): s for s in kernel_stats.collect("sm_90", 7)}


def fast_kernels():
    """The budgeted kernels: every kernel that is not a naive baseline (involution_naive.cu)."""
    names = [n for _, ks, _ in kernel_stats.discover() for n in ks if "naive" not in n]
    return [(n, d) for n in names for d in DTYPES]


def _param(pair):
    reason = CURRENT_MISSES.get(pair)
    marks = [pytest.mark.xfail(strict=True, reason=f"measured: {reason}")] if reason else []
    return pytest.param(*pair, marks=marks, id=f"{pair[0]}-{pair[1]}")


def test_finds_loops_in_synthetic_sass():
    """Innermost loop with the most multiply-adds; HFMA2 counts 2; NOPs are not counted."""
    sass = "\n".join(
        f"        /*{a:04x}*/                   {t} ;"
        for a, t in [
            (0x00, "MOV R1, R2"),
            (0x10, "FFMA R3, R4, R5, R3"),  # outer loop 0x10..0x70
            (0x20, "LDG.E R4, [R6.64]"),  # inner loop 0x20..0x50: 2 FMAs + 3 others
            (0x30, "HFMA2 R7, R8, R9, R7"),
            (0x40, "NOP"),
            (0x50, "@P0 BRA 0x20"),
            (0x60, "FFMA R3, R4, R5, R3"),
            (0x70, "@!P1 BRA 0x10"),
            (0x80, "EXIT"),
            (0x90, "BRA 0x90"),
        ]
    )
    instructions = kernel_stats.parse_sass(sass)
    assert len(instructions) == 10
    assert kernel_stats.steady_state_loop(instructions) == (3, 2)
    assert kernel_stats.opcode("@!P0 HFMA2.MMA R1, R2, R3, R4") == "HFMA2"


def test_occupancy_rule():
    # sm_90: 104 registers -> 3328 per warp -> 19 warps -> 4 blocks of 4 warps.
    assert kernel_stats.warps_per_sm("sm_90", 104, 0, 128) == 16
    assert kernel_stats.warps_per_sm("sm_90", 188, 0, 128) == 8
    assert kernel_stats.warps_per_sm("sm_90", 32, 0, 256) == 64
    assert kernel_stats.warps_per_sm("sm_90", 32, 100 * 1024, 256) == 16  # 2 blocks by smem


@needs_tools
def test_reports_every_kernel_and_dtype(stats):
    expected = {(n, d) for _, names, _ in kernel_stats.discover() for n in names for d in DTYPES}
    assert set(stats) == expected
    assert {"involution_forward", "involution_naive_grad_weight"} <= {k for k, _ in stats}
    for s in stats.values():
        assert 1.0 <= s.instr_per_fma < 200 and s.loop_fmas >= 1, s
        assert 1 <= s.registers <= 255 and 1 <= s.warps_per_sm <= 64 and s.spill_bytes >= 0, s
        assert s.block == (128 if s.source == "involution_cuda.cu" else 256), s
        assert s.line().startswith(f"{s.kernel} {s.dtype} K=7 instr/fma ")


@needs_tools
@pytest.mark.parametrize("kernel,dtype", [_param(p) for p in fast_kernels()])
def test_budget(stats, kernel, dtype):
    s = stats[(kernel, dtype)]
    budget = next(v for k, v in BUDGET.items() if k in kernel)
    assert s.instr_per_fma <= budget, s.line()
    assert s.spill_bytes == 0, s.line()
    assert s.warps_per_sm >= MIN_WARPS, s.line()
