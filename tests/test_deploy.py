"""Deployment paths run and give PyTorch's numbers: ONNX (onnxruntime), torch.export, TorchScript.

* ONNX with ``torch.onnx.export(..., dynamo=False)``: a RedNet-26 classifier (odd input sizes) and
  the RedNet-50 involution-FPN backbone of the Faster R-CNN config (sizes divisible by 32, as
  every Detectron2 FPN needs), executed by onnxruntime, within 1e-4 of PyTorch, at the export size
  and (dynamic N/H/W axes) at another size.
* ``torch.export`` of the backbone with dynamic H and W (multiples of 32), run at two sizes.
* TorchScript traced inside ``pure_pytorch_trace()`` runs in a process where d2_involution cannot
  be imported.

The modules have random norm weights (tests/random_weights.py) so every block matters.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone
from random_weights import randomize_norms

from d2_involution import add_involution_config
from d2_involution.classification import RedNetClassifier
from d2_involution.modeling import build_rednet
from d2_involution.ops import pure_pytorch_trace

onnx = pytest.importorskip("onnx", reason="onnx is installed by tools/setup.sh")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is installed by tools/setup.sh")

REPO = Path(__file__).resolve().parents[1]
BACKBONE_CONFIG = (
    REPO / "configs" / "COCO-Detection" / "faster_rcnn_rednet50_involution_fpn_1x.yaml"
)
TOL = 1e-4
CLASSIFIER_SIZES = [(57, 83), (64, 64)]


def classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    net = RedNetClassifier(build_rednet(26, stem_involution_kernel=3, norm="BN"), 10)
    return randomize_norms(net).eval()


def backbone() -> torch.nn.Module:
    cfg = add_involution_config(get_cfg())
    cfg.merge_from_file(str(BACKBONE_CONFIG))
    torch.manual_seed(0)
    return randomize_norms(build_backbone(cfg)).eval()


def trace(model: torch.nn.Module, size) -> torch.jit.ScriptModule:
    """The model traced with standard operators only (``pure_pytorch_trace``)."""
    with pure_pytorch_trace(), torch.no_grad():
        return torch.jit.trace(model, (torch.randn(1, 3, *size),))


def export_onnx(model: torch.nn.Module, size, path: Path, output_names) -> "ort.InferenceSession":
    """``torch.onnx.export`` (a module, or a module traced at ``size``) -> onnxruntime session."""
    torch.onnx.export(
        model,
        (torch.randn(1, 3, *size),),
        str(path),
        dynamo=False,
        input_names=["images"],
        output_names=list(output_names),
        dynamic_axes={"images": {0: "N", 2: "H", 3: "W"}},
    )
    onnx.checker.check_model(str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def max_onnx_error(model, session, size, output_names) -> float:
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    ref = [ref] if isinstance(ref, torch.Tensor) else [ref[k] for k in output_names]
    got = session.run(None, {"images": x.numpy()})
    assert [g.shape for g in got] == [tuple(r.shape) for r in ref]
    assert all(r.abs().max() > 1e-3 for r in ref)  # outputs with something in them
    return max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, ref))


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """{size: (model, its trace at that size, that trace exported to ONNX: a session)}."""
    model, folder = classifier(), tmp_path_factory.mktemp("onnx")
    ret = {}
    for size in CLASSIFIER_SIZES:
        traced = trace(model, size)
        path = folder / f"c{size[0]}x{size[1]}.onnx"
        ret[size] = model, traced, export_onnx(traced, size, path, ["y"])
    return ret


@pytest.fixture(scope="module")
def onnx_backbone(tmp_path_factory):
    model = backbone()
    names = list(model.output_shape())
    path = tmp_path_factory.mktemp("onnx") / "b.onnx"
    return model, export_onnx(model, (64, 96), path, names), names


@pytest.mark.parametrize("size", CLASSIFIER_SIZES)
def test_onnx_classifier_matches_pytorch(size, classifiers):
    model, _, session = classifiers[size]
    assert max_onnx_error(model, session, size, ["y"]) < TOL


def test_onnx_backbone_matches_pytorch(onnx_backbone):
    model, session, names = onnx_backbone
    assert names == ["p2", "p3", "p4", "p5", "p6"]
    assert max_onnx_error(model, session, (64, 96), names) < TOL


def test_onnx_classifier_dynamic_size(classifiers):
    model, _, session = classifiers[CLASSIFIER_SIZES[0]]
    assert max_onnx_error(model, session, CLASSIFIER_SIZES[1], ["y"]) < TOL


def test_onnx_backbone_dynamic_size(onnx_backbone):
    model, session, names = onnx_backbone
    assert max_onnx_error(model, session, (96, 160), names) < TOL


def test_torch_export_backbone_dynamic_size():
    """H, W = 32 * (3..64): torch.export specialises sizes of 1, and P6 is 1 pixel below 96."""
    model = backbone()
    h, w = torch.export.Dim("h", min=3, max=64), torch.export.Dim("w", min=3, max=64)
    x = torch.randn(1, 3, 96, 128)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {2: 32 * h, 3: 32 * w}})
    for size in [(96, 160), (128, 96)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            ref, got = model(x), program.module()(x)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5)


def test_torchscript_runs_without_d2_involution(classifiers, tmp_path):
    model, traced, _ = classifiers[CLASSIFIER_SIZES[0]]
    x = torch.randn(1, 3, *CLASSIFIER_SIZES[0])
    with torch.no_grad():
        expected = model(x)
    traced.save(str(tmp_path / "rednet26.pt"))
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["d2_involution"] = None  # importing it would fail
        import torch
        model = torch.jit.load({str(tmp_path / "rednet26.pt")!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        err = (model(io["x"]) - io["expected"]).abs().max().item()
        print("max error", err)
        assert err < 1e-5, err
        """)
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "max error" in result.stdout
