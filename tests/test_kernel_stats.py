"""tools/kernel_stats.py: static SASS statistics of the CUDA kernels as cuda_kernel.py builds them
(NVRTC + ptxas + cuobjdump, no GPU), and the issue-12 budget at K = 7, stride 1, on sm_90.

The budget, for every tiled kernel in every dtype and layout (the fused kernels count as the op
they replace: fused forward as forward, fused grad-input as grad-input): <= 2.0 SASS instructions
per multiply-add in the steady-state loop for forward, <= 3.0 for grad-input and grad-weight, no
spills, >= 16 resident warps an SM, and the host would launch it. The naive baseline is reported
but not budgeted. A (kernel, dtype) that misses the budget today is xfail(strict=True) with its
measured value (CURRENT_MISSES), so an improvement that meets it fails here until its entry goes,
and a regression of any other kernel fails outright.
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

ARCH, K = "sm_90", 7
DTYPES = ("float16", "bfloat16", "float32", "float64")
BUDGET = {"forward": 2.0, "grad_input": 3.0, "grad_weight": 3.0}  # instr/fma, by op
MIN_WARPS = 16
# The kernels the host launches for the tiled ops (grad-weight's _acc: the fused backward's).
TILED = [
    f"involution_{op}{acc}_{layout}"
    for op in ("forward", "grad_input", "grad_weight", "fused_forward", "fused_grad_input")
    for acc in (("", "_acc") if op == "grad_weight" else ("",))
    for layout in ("nchw", "nhwc")
]
NAIVE = ["involution_naive_forward", "involution_naive_grad_input", "involution_naive_grad_weight"]
# Measured with python tools/kernel_stats.py --arch sm_90 --kernel-size 7 (docs/benchmarks.md).
CURRENT_MISSES: dict = {}  # every tiled kernel meets the budget in every dtype

MISSING = kernel_stats.missing_tools(ARCH)
needs_tools = pytest.mark.skipif(bool(MISSING), reason=f"NVRTC/ptxas/cuobjdump: {MISSING}")


@pytest.fixture(scope="module")
def stats():
    """Every kernel x dtype, compiled once for this module (about 30 s of CPU)."""
    return {(s.kernel, s.dtype): s for s in kernel_stats.collect(ARCH, K)}


def budget_of(kernel: str) -> float:
    return BUDGET[kernel_stats.op_of(kernel).replace("fused_", "")]


def _param(kernel: str, dtype: str):
    measured = CURRENT_MISSES.get((kernel, dtype))
    reason = f"measured {measured}, budget {budget_of(kernel)}"
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if measured else []
    return pytest.param(kernel, dtype, marks=marks, id=f"{kernel}-{dtype}")


def test_finds_loops_in_synthetic_sass():
    """Innermost loop with the most multiply-adds; HFMA2 counts 2, one with an RZ factor 0;
    NOPs are not counted."""
    sass = "\n".join(
        f"        /*{a:04x}*/                   {t} ;"
        for a, t in [
            (0x00, "MOV R1, R2"),
            (0x10, "FFMA R3, R4, R5, R3"),  # outer loop 0x10..0x70
            (0x20, "LDG.E R4, [R6.64]"),  # inner loop 0x20..0x50: 4 instructions, 2 FMAs
            (0x30, "HFMA2 R7, R8, R9, R7"),
            (0x38, "@P1 HFMA2.MMA R10, -RZ, RZ, 0, 0"),  # a constant load, no multiply-add
            (0x40, "NOP"),
            (0x50, "@P0 BRA 0x20"),
            (0x60, "FFMA R3, R4, R5, R3"),
            (0x70, "@!P1 BRA 0x10"),
            (0x80, "EXIT"),
            (0x90, "BRA 0x90"),
        ]
    )
    instructions = kernel_stats.parse_sass(sass)
    assert len(instructions) == 11
    assert kernel_stats.steady_state_loop(instructions) == (4, 2)
    assert kernel_stats.fma_count([(0, "FFMA R1, R2, RZ, R3"), (1, "DFMA R2, R4, R6, R2")]) == 1
    assert kernel_stats.opcode("@!P0 HFMA2.MMA R1, R2, R3, R4") == "HFMA2"


def test_occupancy_rule():
    # sm_90: 104 registers -> 3328 a warp -> 4 warps a 16384-register sub-partition.
    assert kernel_stats.warps_per_sm("sm_90", 104, 0, 128) == 16
    assert kernel_stats.warps_per_sm("sm_90", 104, 0, 32) == 16  # not 65536 // 3328 = 19
    assert kernel_stats.warps_per_sm("sm_90", 188, 0, 128) == 8
    assert kernel_stats.warps_per_sm("sm_90", 80, 0, 224) == 21  # 24 by registers, 7-warp blocks
    assert kernel_stats.warps_per_sm("sm_90", 32, 0, 256) == 64
    assert kernel_stats.warps_per_sm("sm_90", 32, 100 * 1024, 256) == 16  # 2 blocks by smem
    assert kernel_stats.warps_per_sm("sm_90", 32, 232 * 1024, 256) == 0  # the tile does not fit


def test_reads_launch_configs_and_ops():
    ptx = ".const .align 4 .b8 involution_forward_nchw_config[24] = {128, 0, 0, 0, 8, 0, 0, 0, 1};"
    assert kernel_stats.launch_configs(ptx) == {"involution_forward_nchw": (128, 8, 1, 0, 0, 0)}
    assert kernel_stats.op_of("involution_grad_weight_acc_nhwc") == "grad_weight"
    assert kernel_stats.op_of("involution_fused_forward_nchw") == "fused_forward"
    assert kernel_stats.op_of("involution_naive_grad_input") == "naive_grad_input"


@needs_tools
def test_reports_every_kernel_and_dtype(stats):
    assert set(stats) == {(k, d) for k in TILED + NAIVE for d in DTYPES}
    for s in stats.values():
        assert 1.0 <= s.instr_per_fma < 200 and s.loop_fmas >= 1, s
        assert 1 <= s.registers <= 255 and 0 <= s.warps_per_sm <= 64 and s.spill_bytes >= 0, s
        assert s.baseline == (s.kernel in NAIVE) and s.launched, s
        assert s.threads > 0 and s.threads % 32 == 0 and s.smem_bytes >= 0, s
        assert s.line().startswith(f"{s.kernel} {s.dtype} K=7 instr/fma ")
    # The tiled kernels are several times leaner than the one-thread-per-output baseline.
    for d in DTYPES:
        assert stats[("involution_forward_nchw", d)].instr_per_fma * 5 < (
            stats[("involution_naive_forward", d)].instr_per_fma
        )


@needs_tools
@pytest.mark.parametrize("kernel,dtype", [_param(k, d) for k in TILED for d in DTYPES])
def test_budget(stats, kernel, dtype):
    s = stats[(kernel, dtype)]
    assert s.instr_per_fma <= budget_of(kernel), s.line()
    assert s.spill_bytes == 0, s.line()
    assert s.warps_per_sm >= MIN_WARPS, s.line()
    assert s.launched and s.smem_bytes > 0, s.line()
