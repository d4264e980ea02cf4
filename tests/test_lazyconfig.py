"""LazyConfig ``.py`` configs build the same models as their YAML twins, and train + evaluate.

For each pair: the same module tree (names, shapes, frozen parameters, the printed modules) and,
with the YAML model's weights (random norm statistics, so every block matters) loaded into the
LazyConfig model, the same detections on a random image. The Shapes LazyConfig trains 2
iterations through tools/lazyconfig_train_net.py and is evaluated on shapes_val; ``--eval-only``
on its final checkpoint reproduces that evaluation.
"""

import sys
from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from random_weights import randomize_norms

from d2_involution import add_involution_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import lazyconfig_train_net  # noqa: E402

CONFIGS = REPO / "configs"
COCO = [
    "COCO-Detection/faster_rcnn_rednet50_fpn_1x",
    "COCO-Detection/faster_rcnn_rednet50_involution_fpn_1x",
    "COCO-InstanceSegmentation/mask_rcnn_rednet50_fpn_1x",
    "COCO-InstanceSegmentation/mask_rcnn_rednet50_involution_fpn_1x",
]
SHAPES_PAIRS = [
    ("Shapes-LazyConfig/faster_rcnn_rednet26_fpn", "Shapes/faster_rcnn_rednet26_fpn"),
    ("Shapes-LazyConfig/mask_rcnn_rednet26_fpn", "Shapes/mask_rcnn_rednet26_fpn"),
]
SHAPES = str(CONFIGS / "Shapes-LazyConfig" / "faster_rcnn_rednet26_fpn.py")


def _yaml_model(name: str) -> torch.nn.Module:
    cfg = add_involution_config(get_cfg())
    cfg.merge_from_file(str(CONFIGS / f"{name}.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    return randomize_norms(build_model(cfg)).eval()


def _detect(model: torch.nn.Module, image: torch.Tensor):
    with torch.no_grad():
        return model([{"image": image, "height": 70, "width": 90}])[0]["instances"]


def _same_module_tree(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    want = {k: (p.shape, p.requires_grad) for k, p in reference.named_parameters()}
    assert {k: (p.shape, p.requires_grad) for k, p in model.named_parameters()} == want
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert str(model) == str(reference)


@pytest.mark.parametrize("name", COCO)
def test_lazyconfig_builds_the_yaml_model(name):
    """RedNet-50 detectors: the module tree (building them is cheap, running them is not)."""
    model = instantiate(LazyConfig.load(str(CONFIGS / f"{name}.py")).model)
    _same_module_tree(model, _yaml_model(name))


@pytest.mark.parametrize("lazy,yaml", SHAPES_PAIRS)
def test_lazyconfig_shapes_model_detects_as_the_yaml_one(lazy, yaml):
    reference = _yaml_model(yaml)
    model = instantiate(LazyConfig.load(str(CONFIGS / f"{lazy}.py")).model).eval()
    _same_module_tree(model, reference)
    model.load_state_dict(reference.state_dict())
    # Score threshold 0 in both: every kept box is compared, not only the confident ones.
    for m in (model, reference):
        assert m.roi_heads.box_predictor.test_score_thresh == 0.05
        m.roi_heads.box_predictor.test_score_thresh = 0.0
    image = torch.randint(0, 256, (3, 64, 96), generator=torch.Generator().manual_seed(0)).float()
    got, expected = _detect(model, image), _detect(reference, image)
    assert len(expected) > 0 and got.get_fields().keys() == expected.get_fields().keys()
    torch.testing.assert_close(got.pred_boxes.tensor, expected.pred_boxes.tensor)
    for field in set(expected.get_fields()) - {"pred_boxes"}:
        torch.testing.assert_close(got.get(field), expected.get(field))


def test_lazyconfig_overrides_reach_the_model():
    cfg = LazyConfig.load(SHAPES)
    cfg = LazyConfig.apply_overrides(cfg, ["model.roi_heads.num_classes=7", "train.max_iter=5"])
    model = instantiate(cfg.model)
    assert model.roi_heads.box_predictor.cls_score.out_features == 8 and cfg.train.max_iter == 5


def test_lazyconfig_trains_and_evaluates_on_shapes(tmp_path, monkeypatch):
    # A small generated copy of the shapes splits: 4 validation images keep the 2 evaluations cheap.
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setenv("D2INV_SHAPES_TRAIN_IMAGES", "8")
    monkeypatch.setenv("D2INV_SHAPES_VAL_IMAGES", "4")
    out = tmp_path / "output"
    opts = [f"train.output_dir={out}", "train.max_iter=2", "train.log_period=1"]
    results = lazyconfig_train_net.main(
        default_argument_parser().parse_args(["--config-file", SHAPES, *opts])
    )
    assert (out / "model_final.pth").is_file() and (out / "config.yaml").is_file()
    assert "total_loss" in (out / "metrics.json").read_text()
    assert set(results["bbox"]) >= {"AP", "AP50"}
    argv = ["--config-file", SHAPES, "--eval-only", f"train.output_dir={out}"]
    argv.append(f"train.init_checkpoint={out / 'model_final.pth'}")
    again = lazyconfig_train_net.main(default_argument_parser().parse_args(argv))
    assert again["bbox"] == pytest.approx(results["bbox"], nan_ok=True)
