#!/usr/bin/env bash
# One-command set-up for d2_involution: a virtual environment with PyTorch + torchvision that load
# together, Detectron2 (installed, from source, or the pb1-detectron2 v0.6 fallback), CuPy where an
# NVIDIA GPU is present (and for the NVRTC compile tests), and the package itself with [dev] extras
# (test and lint tools, onnx + onnxruntime).
# Idempotent: what is already there and working is kept. Stops with a one-line reason on failure.
#
# Environment: VENV (default .venv), D2INV_DETECTRON2=auto|source|pb1 (default auto),
#              D2INV_NO_CUPY=1 to skip CuPy.
set -uo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
MODE=${D2INV_DETECTRON2:-auto}
TORCH_SPEC=${D2INV_TORCH:-"torch==2.14.1"}
TV_SPEC=${D2INV_TORCHVISION:-"torchvision>=0.29.1,<0.30"}
D2_GIT=https://github.com/facebookresearch/detectron2.git

say() { echo "[setup] $*"; }
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

PY_SYS=${PYTHON:-python3}
command -v "$PY_SYS" >/dev/null || die "no python3 on PATH (need Python >= 3.9)"

torch_ok='import torch, torchvision, torchvision.ops as o; o.nms(torch.zeros(1,4), torch.zeros(1), 0.5)'

if [ ! -x "$VENV/bin/python" ]; then
    if "$PY_SYS" -c "$torch_ok" >/dev/null 2>&1; then
        say "creating $VENV with system site-packages (keeping the working torch + torchvision there)"
        "$PY_SYS" -m venv --system-site-packages "$VENV" || die "could not create $VENV"
    else
        say "creating $VENV"
        "$PY_SYS" -m venv "$VENV" || die "could not create $VENV"
    fi
fi
PY="$VENV/bin/python"
PIP=(pip_quiet "$PY" -m pip install -q --disable-pip-version-check)

say "upgrading pip and wheel"
"${PIP[@]}" --upgrade pip wheel >/dev/null || die "pip could not upgrade itself (registry unreachable?)"

if "$PY" -c "$torch_ok" >/dev/null 2>&1; then
    say "keeping torch $("$PY" -c 'import torch; print(torch.__version__)') + torchvision $("$PY" -c 'import torchvision; print(torchvision.__version__)')"
else
    say "installing $TORCH_SPEC and $TV_SPEC (several GB, about a minute)"
    "${PIP[@]}" "$TORCH_SPEC" "$TV_SPEC" || die "could not install $TORCH_SPEC + $TV_SPEC"
    "$PY" -c "$torch_ok" >/dev/null 2>&1 || die "torch and torchvision installed but do not load together"
fi

say "installing detectron2's runtime dependencies"
"${PIP[@]}" "fvcore>=0.1.5" "iopath>=0.1.7,<0.1.10" pycocotools opencv-python-headless "yacs>=0.1.8" \
    termcolor tabulate cloudpickle tqdm tensorboard matplotlib "omegaconf>=2.1" "hydra-core>=1.1" \
    Pillow scipy || die "could not install detectron2's dependencies"

d2_source=""
if "$PY" -c "import detectron2" >/dev/null 2>&1; then
    d2_source="already installed"
fi
if [ -z "$d2_source" ] && [ "$MODE" != "pb1" ]; then
    if timeout 20 git ls-remote "$D2_GIT" HEAD >/dev/null 2>&1; then
        say "building detectron2 from $D2_GIT (a few minutes)"
        if "${PIP[@]}" --no-build-isolation "git+$D2_GIT"; then
            d2_source="source ($D2_GIT)"
        else
            say "building detectron2 from source failed"
        fi
    else
        say "detectron2's source ($D2_GIT) cannot be reached from here"
    fi
    [ -z "$d2_source" ] && [ "$MODE" = "source" ] && die "D2INV_DETECTRON2=source but it could not be built"
fi
if [ -z "$d2_source" ]; then
    say "installing pb1-detectron2==0.6 (official v0.6 Python sources; C++ extension disabled: it ships no csrc)"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    src=$("$PY" tools/pb1_detectron2.py "$tmp") || die "could not fetch pb1-detectron2==0.6 (see above)"
    "${PIP[@]}" --no-deps --no-build-isolation "$src" || die "could not install pb1-detectron2==0.6"
    d2_source="pb1-detectron2==0.6 (no compiled ops)"
fi

cuda_major=$("$PY" -c 'import torch; v=torch.version.cuda; print(v.split(".")[0] if v else "")')
if [ -n "${D2INV_NO_CUPY:-}" ]; then
    say "skipping CuPy (D2INV_NO_CUPY set)"
elif [ -z "$cuda_major" ]; then
    say "torch is a CPU-only build: skipping CuPy (the CUDA involution kernels need it)"
elif "$PY" -c "import cupy_backends.cuda.libs.nvrtc" >/dev/null 2>&1; then
    say "keeping CuPy $("$PY" -c 'import cupy; print(cupy.__version__)' 2>/dev/null || echo '(no GPU here)')"
else
    say "installing cupy-cuda${cuda_major}x (matches torch's CUDA $cuda_major)"
    "${PIP[@]}" "cupy-cuda${cuda_major}x>=13" || say "CuPy could not be installed: CUDA kernels unavailable"
fi

say "installing d2_involution (editable) with [dev] extras"
"${PIP[@]}" --no-build-isolation --no-deps -e . || die "could not install d2_involution"
"${PIP[@]}" pytest black isort flake8 || die "could not install the test and lint tools"
say "installing onnx + onnxruntime (the export tests run the exported graphs)"
"${PIP[@]}" onnx onnxruntime || die "could not install onnx + onnxruntime"

"$PY" - "$d2_source" <<'PYEOF' || die "d2_involution does not import after set-up"
import sys

import detectron2
import torch
import torchvision

import d2_involution
from d2_involution import compat

print(f"[setup] torch {torch.__version__} (CUDA build: {torch.version.cuda}, GPU: {torch.cuda.is_available()})")
print(f"[setup] torchvision {torchvision.__version__}")
print(f"[setup] detectron2 {detectron2.__version__} from {sys.argv[1]}")
for line in compat.describe_gaps():
    print(f"[setup]   unavailable: {line}")
try:
    import cupy

    print(f"[setup] cupy {cupy.__version__}")
except Exception as e:  # noqa: BLE001 - report, never fail set-up for an optional package
    print(f"[setup] cupy unavailable ({type(e).__name__}): CUDA involution kernels disabled")
print(f"[setup] done. Run the tests with: {sys.executable} -m pytest tests")
PYEOF
