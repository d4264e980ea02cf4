#!/usr/bin/env bash
# The one prepared GPU check (docs/benchmarks.md, "The GPU check"), for an offline GPU node:
#   install  the bundle (tools/gpu_bundle.sh) into a temporary site dir, no network
#   ops      CuPy's kernel cache warmed in parallel (tools/warm_cuda_cache.py), then CUDA op tests: every dtype and layout against the reference, fp64 gradcheck, a case
#            with more than 2**31 input elements, odd sizes with stride 2 (tests/test_ops_cuda.py)
#   memcheck compute-sanitizer --tool memcheck on a small op test
#   op_bench tools/benchmark_involution.py --device cuda (ours, naive, unfold, bandwidth floor;
#            fp32, bf16, fp16; NCHW and NHWC kernels; fused kernel generation vs unfused)
#   models   tools/benchmark.py: RedNet-50 vs ResNet-50 classifiers and Faster R-CNN FPN
#            detectors, AMP none and bf16
#   gpu_tests the rest of the suite's GPU tests (pytest -m cuda)
# Each step has its own time limit within --budget seconds (default 480) and writes its output as
# it runs, so a run cut short keeps what finished. Results (at most 8 files): summary.md plus each
# step's log or markdown, in $OUT when set, else ./gpu_results.
#
# --dry-run runs the same steps on a CPU machine: GPU steps become their CPU counterparts (tiny
# benchmarks on the CPU, AMP none only; test selections collected, not run) or are skipped with a
# line. CI runs it (tests/test_gpu_check.py), so the script cannot rot.
#
# Usage: tools/gpu_check.sh [--dry-run] [--bundle DIR] [--budget SECONDS]
# Environment: D2INV_PYTHON (interpreter; default .venv/bin/python if present, else python3),
#              OUT (results folder). The bundle defaults to .gpu_bundle; it is installed only where
#              detectron2 and its dependencies do not import already, or when --bundle is given.
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0
BUNDLE=.gpu_bundle
BUNDLE_GIVEN=0
BUDGET=480
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --bundle) BUNDLE=$2; BUNDLE_GIVEN=1; shift ;;
        --budget) BUDGET=$2; shift ;;
        *) echo "usage: tools/gpu_check.sh [--dry-run] [--bundle DIR] [--budget SECONDS]" >&2; exit 2 ;;
    esac
    shift
done
if [ -n "${D2INV_PYTHON:-}" ]; then
    PY=$D2INV_PYTHON
elif [ -x .venv/bin/python ]; then
    PY=$REPO/.venv/bin/python
else
    PY=python3
fi
RESULTS=${OUT:-$REPO/gpu_results}
mkdir -p "$RESULTS"
SUMMARY=$RESULTS/summary.md
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTEST_ADDOPTS="-p no:cacheprovider"
START=$(date +%s)
ROWS=()
ENVIRONMENT=""
FAILED=0
MAX_LOG_BYTES=$((512 * 1024))

say() { echo "[gpu_check] $*"; }

write_summary() {
    {
        echo "# GPU check$([ $DRY = 1 ] && echo ' (dry run)')"
        echo
        echo "- command: \`bash tools/gpu_check.sh $([ $DRY = 1 ] && echo '--dry-run ')--budget $BUDGET\`"
        echo "- started: $(date -u -d "@$START" '+%Y-%m-%d %H:%M:%S UTC'), host $(hostname), python \`$PY\`"
        [ -n "$ENVIRONMENT" ] && echo "- environment: $ENVIRONMENT"
        echo "- elapsed: $(( $(date +%s) - START )) s of $BUDGET s"
        echo "- files: $(cd "$RESULTS" && ls | tr '\n' ' ')"
        echo
        echo "| step | status | seconds | detail |"
        echo "|---|---|---:|---|"
        printf '%s\n' "${ROWS[@]}"
    } > "$SUMMARY"
}

record() {  # record NAME STATUS SECONDS DETAIL
    local detail=${4//|/\\|}
    ROWS+=("| $1 | $2 | $3 | $detail |")
    [ "$2" = failed ] && FAILED=1
    say "$1: $2 in $3 s${4:+ ($4)}"
    write_summary
}

last_result_line() {  # the closing line of pytest or the last line of a log
    local line
    line=$(grep -E '[0-9]+ (passed|failed|skipped|error|errors|deselected)|no tests ran|tests? collected' "$1" | tail -n 1)
    [ -n "$line" ] || line=$(grep -v '^\s*$' "$1" | tail -n 1)
    echo "$line" | sed -e 's/=//g' -e 's/^ *//' -e 's/ *$//' | cut -c 1-300
}

table_rows() {  # the body rows of the markdown tables in a file
    awk '/^\|---/ { body = 1; next } body && /^\|/ { print } !/^\|/ { body = 0 }' "$1" 2>/dev/null
}

cap_log() {  # keep a log under MAX_LOG_BYTES: its head and its tail
    local size
    size=$(wc -c < "$1")
    if [ "$size" -gt "$MAX_LOG_BYTES" ]; then
        { head -c $((MAX_LOG_BYTES / 4)); echo; echo "[... $size bytes, middle cut ...]";
          tail -c $((MAX_LOG_BYTES * 3 / 4)); } < "$1" > "$1.cut" && mv "$1.cut" "$1"
    fi
}

# run_step NAME LIMIT LOG CMD...: runs CMD with LOG as its output, under min(LIMIT, budget left).
# Sets STEP_RC (124: timed out, 125: skipped for lack of budget) and STEP_SECONDS.
run_step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$(( BUDGET - ($(date +%s) - START) - 5 ))
    [ "$limit" -gt "$left" ] && limit=$left
    STEP_SECONDS=0
    if [ "$limit" -lt 10 ]; then
        STEP_RC=125
        return
    fi
    say "$name: running (limit $limit s) -> $(basename "$log")"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$log" 2>&1
    STEP_RC=$?
    [ "$STEP_RC" = 137 ] && STEP_RC=124
    STEP_SECONDS=$(( $(date +%s) - t0 ))
    cap_log "$log"
}

# finish_step NAME LOG [DETAIL]: records passed / failed / timed out / skipped from STEP_RC, with
# DETAIL (default: the log's closing line).
finish_step() {
    local name=$1 log=$2 detail=${3:-}
    case "$STEP_RC" in
        0) record "$name" passed "$STEP_SECONDS" "${detail:-$(last_result_line "$log")}" ;;
        124) record "$name" failed "$STEP_SECONDS" "timed out; last: $(last_result_line "$log")" ;;
        125) record "$name" skipped 0 "no budget left" ;;
        *) record "$name" failed "$STEP_SECONDS" "exit $STEP_RC: ${detail:-$(last_result_line "$log")}" ;;
    esac
}

install_bundle() {
    local log=$SITE/install.log
    if [ $BUNDLE_GIVEN = 0 ] && "$PY" -c "import detectron2, fvcore, iopath, yacs, termcolor, \
omegaconf, hydra, pycocotools" > /dev/null 2>&1; then
        record install passed 0 "detectron2 and its dependencies already import; bundle not needed"
        return
    fi
    local wheels=("$BUNDLE"/*.whl)
    if [ ! -e "${wheels[0]}" ]; then
        record install skipped 0 "no wheels in $BUNDLE (build them with tools/gpu_bundle.sh); steps needing detectron2 will fail"
        return
    fi
    if "$PY" -m pip --version > /dev/null 2>&1; then
        run_step install 120 "$log" "$PY" -m pip install --no-index --no-deps --target "$SITE" \
            --disable-pip-version-check -q "${wheels[@]}"
    else  # no pip: wheels are zip files laid out for site-packages
        run_step install 120 "$log" "$PY" -c 'import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])' "$SITE" "${wheels[@]}"
    fi
    local names
    names=$(cd "$SITE" && ls -d *.dist-info 2>/dev/null | sed 's/\.dist-info$//' | tr '\n' ' ')
    finish_step install "$log" "${#wheels[@]} wheels from $BUNDLE into a temporary site dir: $names"
}

describe_environment() {
    ENVIRONMENT=$("$PY" - 2>&1 <<'EOF' | tail -n 1
import importlib
from importlib import metadata

import torch

parts = [f"torch {torch.__version__}"]
if torch.cuda.is_available():
    parts.append(f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
else:
    parts.append("no CUDA device")
for name in ("cupy", "detectron2", "fvcore", "pycocotools"):
    try:
        module = importlib.import_module(name)
        version = getattr(module, "__version__", None) or metadata.version(name)
        parts.append(f"{name} {version}")
    except Exception as e:  # noqa: BLE001 - report what is missing, never stop here
        parts.append(f"{name} unavailable ({type(e).__name__})")
print(", ".join(parts))
EOF
)
    say "environment: $ENVIRONMENT"
    write_summary
}

PYTEST=("$PY" -m pytest -q -rfEs --tb=short)
COLLECT=()
[ $DRY = 1 ] && COLLECT=(--collect-only)
say "python: $PY; results: $RESULTS; budget: $BUDGET s$([ $DRY = 1 ] && echo '; dry run')"
write_summary
install_bundle
describe_environment

# ops: the CUDA op tests (in a dry run: collected, since they need a GPU). First CuPy's kernel
# cache is warmed in parallel (tools/warm_cuda_cache.py; no row of its own): a cold cache would
# compile the ~150 instantiations the tests and benchmarks need one after the other.
warm=""
if [ $DRY = 0 ]; then
    run_step warm 120 "$SITE/warm.log" "$PY" tools/warm_cuda_cache.py
    warm="; cache warm-up: $(tail -n 1 "$SITE/warm.log" 2>/dev/null) (exit $STEP_RC)"
    say "warm${warm#;}"
fi
log=$RESULTS/ops_tests.txt
run_step ops 150 "$log" "${PYTEST[@]}" "${COLLECT[@]}" -m cuda tests/test_ops_cuda.py
finish_step ops "$log" "$(last_result_line "$log")$warm"

# memcheck: a small op test under compute-sanitizer, with PyTorch's caching allocator off so that
# every tensor is its own allocation (an out-of-bounds access cannot land in a cached block).
log=$RESULTS/memcheck.txt
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
if [ $DRY = 1 ]; then
    record memcheck skipped 0 "dry run: needs a GPU"
elif [ -z "$sanitizer" ]; then
    record memcheck skipped 0 "compute-sanitizer not found (PATH, /usr/local/cuda*/bin)"
else
    run_step memcheck 150 "$log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck \
        --error-exitcode 99 --print-limit 20 "${PYTEST[@]}" tests/test_ops_cuda.py -k small_for_memcheck
    errors=$(grep -Eo 'ERROR SUMMARY: [0-9]+ error' "$log" | tail -n 1)
    if [ "$STEP_RC" = 0 ] && [ "$errors" = "ERROR SUMMARY: 0 error" ]; then
        finish_step memcheck "$log" "$errors(s); $(last_result_line "$log")"
    elif [ -z "$errors" ] && [ "$STEP_RC" != 124 ] && ! grep -q 'passed\|failed' "$log"; then
        record memcheck skipped "$STEP_SECONDS" "compute-sanitizer did not run the test: $(last_result_line "$log")"
    else
        [ "$STEP_RC" = 0 ] && STEP_RC=99
        finish_step memcheck "$log"
    fi
fi

# op_bench: the involution op, ours vs naive vs unfold vs the bandwidth floor.
log=$RESULTS/benchmark_involution.md
if [ $DRY = 1 ]; then
    run_step op_bench 60 "$log" "$PY" tools/benchmark_involution.py --device cpu --shapes res5 \
        --batch 1 --repeats 1 --warmup 0 --no-memory --paths ours unfold
else
    run_step op_bench 170 "$log" "$PY" tools/benchmark_involution.py --device cuda \
        --dtypes float32 bfloat16 float16 --layouts nchw nhwc --fused --repeats 20 --warmup 5
fi
finish_step op_bench "$log" "$(table_rows "$log" | wc -l) table rows"

# models: RedNet-50 vs ResNet-50 (classifiers, Faster R-CNN FPN), AMP none / bf16.
log=$RESULTS/benchmark_models.log
MODELS=rednet50_cls,resnet50_cls,faster_rcnn_rednet50_fpn,faster_rcnn_R50_fpn
if [ $DRY = 1 ]; then
    run_step models 120 "$log" "$PY" tools/benchmark.py --device cpu --models "$MODELS" \
        --amp none --batch 2 --det-batch 1 --image-size 32 --det-size 64 64 --iters 1 \
        --warmup 0 --output "$RESULTS/benchmark_models"
else
    run_step models 180 "$log" "$PY" tools/benchmark.py --device cuda --models "$MODELS" \
        --amp none,bf16 --batch 64 --det-batch 2 --iters 10 --warmup 3 \
        --output "$RESULTS/benchmark_models"
fi
rows=$(table_rows "$RESULTS/benchmark_models.md" | wc -l)
failed_rows=$(table_rows "$RESULTS/benchmark_models.md" | grep -vc '|  |$')  # note column set
[ "$STEP_RC" = 0 ] && [ "${failed_rows:-0}" -gt 0 ] && STEP_RC=1
finish_step models "$log" "${rows:-0} rows in benchmark_models.md, ${failed_rows:-0} with an error note"

# gpu_tests: every other test marked cuda (AMP training step, RedNet/FPN and layer on CUDA).
log=$RESULTS/gpu_tests.txt
run_step gpu_tests 120 "$log" "${PYTEST[@]}" "${COLLECT[@]}" -m cuda tests \
    --ignore=tests/test_ops_cuda.py
finish_step gpu_tests "$log"

say "done in $(( $(date +%s) - START )) s: $SUMMARY"
exit $FAILED
