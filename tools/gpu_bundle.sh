#!/usr/bin/env bash
# Everything the offline GPU node lacks for tools/gpu_check.sh, as wheels in DIR (at most 32 MiB,
# so that DIR travels with the checkout; see docs/benchmarks.md, "The GPU check").
#
# The node has Python 3.12 with torch, torchvision, CuPy, numpy, OpenCV, Pillow, pytest, tabulate,
# tqdm, PyYAML, cloudpickle and portalocker (and their dependencies: packaging, setuptools, ...),
# and no network. This downloads (here, where the package
# registries are reachable) Python 3.12 manylinux x86_64 wheels of what it lacks, builds wheels of
# the pure-Python packages that PyPI has only as sources, and builds the detectron2 v0.6 fallback
# (pb1-detectron2, extension disabled) into a pure wheel.
#
# Usage: tools/gpu_bundle.sh DIR       (the wheels already in DIR are replaced)
# Environment: PYTHON (the interpreter that runs pip here; default .venv/bin/python, else
#              python3), D2INV_BUNDLE_PYTHON (the node's Python version, default 3.12).
set -euo pipefail

cd "$(dirname "$0")/.."
say() { echo "[gpu_bundle] $*"; }
die() { echo "[gpu_bundle] ERROR: $*" >&2; exit 1; }
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

[ $# -eq 1 ] || die "usage: tools/gpu_bundle.sh DIR"
DIR=$1
LIMIT_MIB=32
NODE_PY=${D2INV_BUNDLE_PYTHON:-3.12}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip"

# The versions the test suite runs with (detectron2 v0.6 pins iopath < 0.1.10). tensorboard (with
# protobuf, absl-py) is what DefaultTrainer's event writers import; matplotlib (with its
# dependencies) is imported by detectron2's Visualizer, i.e. tools/demo.py and its tests.
WHEELS=(
    "iopath==0.1.9"
    "yacs==0.1.8"
    "termcolor==3.3.0"
    "omegaconf==2.3.1"
    "hydra-core==1.3.8"
    "pycocotools==2.0.11"
    "tensorboard==2.21.0"
    "protobuf==7.36.2"
    "absl-py==2.5.1"
    "matplotlib==3.11.2"
    "contourpy==1.3.3"
    "cycler==0.12.1"
    "fonttools==4.68.0"
    "kiwisolver==1.5.1"
    "pyparsing==3.3.3"
    "python-dateutil==4.0.0"
)
SDISTS=(  # pure Python, published as sources only
    "fvcore==0.1.5.post20221221"
    "antlr4-python3-runtime==4.9.3"
)

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
top=$(git rev-parse --show-toplevel 2>/dev/null || true)
if [ -n "$top" ] && [[ "$DIR/" == "$top/"* ]] && ! git check-ignore -q "$DIR/"; then
    die "$DIR is inside the checkout but not git-ignored (use .gpu_bundle/, listed in .gitignore)"
fi
rm -f "$DIR"/*.whl
# This machine's pip configuration names local indexes that may not exist: drop that warning.
PIP=(pip_quiet "$PYTHON" -m pip --disable-pip-version-check -q)

say "downloading Python $NODE_PY manylinux x86_64 wheels: ${WHEELS[*]}"
"${PIP[@]}" download --no-deps --only-binary=:all: --python-version "$NODE_PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DIR" "${WHEELS[@]}" || die "could not download the wheels"

say "building wheels of ${SDISTS[*]} (pure Python)"
"${PIP[@]}" wheel --no-deps --no-binary=:all: -w "$DIR" "${SDISTS[@]}" \
    || die "could not build ${SDISTS[*]}"

say "building the detectron2 v0.6 fallback (pb1-detectron2, no extension) into a pure wheel"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
src=$("$PYTHON" tools/pb1_detectron2.py "$tmp") || die "could not fetch pb1-detectron2==0.6 (see above)"
"${PIP[@]}" wheel --no-deps --no-build-isolation -w "$DIR" "$src" \
    || die "could not build pb1-detectron2==0.6 (its setup.py needs torch in $PYTHON)"

for whl in "$DIR"/*.whl; do
    case "$(basename "$whl")" in
        *-none-any.whl | *-cp${NODE_PY/./}-*manylinux*x86_64*.whl | *-abi3-*manylinux*x86_64*.whl) ;;
        *) die "$(basename "$whl") is not a pure or Python $NODE_PY manylinux x86_64 wheel" ;;
    esac
done
ls -l "$DIR"/*.whl | awk '{printf "[gpu_bundle]   %8.1f KiB  %s\n", $5 / 1024, $9}'
bytes=$(cat "$DIR"/*.whl | wc -c)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.2f", b / 1048576 }')
count=$(ls "$DIR"/*.whl | wc -l)
if [ "$bytes" -gt $((LIMIT_MIB * 1048576)) ]; then
    die "the bundle is $mib MiB ($count wheels), over the $LIMIT_MIB MiB limit"
fi
say "bundle: $count wheels, $mib MiB (limit $LIMIT_MIB MiB) in $DIR"
