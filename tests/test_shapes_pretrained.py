"""``MODEL.WEIGHTS shapes-pretrained://NAME``: pre-trained on first use, cached, keyed by recipe.

A tiny recipe (RedNet-26 on a 24-image shapes folder at 32 px, 4 iterations) stands in for
``configs/Shapes-Classification/rednet26.yaml``: the handler is pointed at a temporary recipe
folder and a temporary datasets root.
"""

from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import d2_involution
from d2_involution.classification import shapes_pretrained
from d2_involution.data import generate_shapes_classification

REPO = Path(__file__).resolve().parents[1]
RECIPE = """_BASE_: "{base}"
MODEL:
  DEVICE: "cpu"
  REDNET:
    DEPTH: 26
  INVOLUTION:
    GENERATOR_INIT: "static"
  CLS:
    NUM_CLASSES: 0
DATASETS:
  CLS:
    ROOT: "{root}"
INPUT:
  CLS:
    TRAIN_CROP_SIZE: 32
    TEST_RESIZE: 32
    TEST_CROP_SIZE: 32
DATALOADER:
  NUM_WORKERS: 0
SOLVER:
  OPTIMIZER: "ADAMW"
  IMS_PER_BATCH: 8
  REFERENCE_WORLD_SIZE: 0
  BASE_LR: {lr}
  WARMUP_ITERS: 1
  MAX_ITER: 4
  CHECKPOINT_PERIOD: 100000
  CLS:
    EPOCHS: 0
TEST:
  EVAL_PERIOD: 0
  CLS:
    IMS_PER_GPU: 8
SEED: 3
"""


@pytest.fixture
def recipes(tmp_path, monkeypatch, one_torch_thread):
    """A recipe folder holding ``tiny.yaml`` and an empty datasets root; returns the folder."""
    data = generate_shapes_classification(
        str(tmp_path / "folder"), num_train_per_class=4, num_val_per_class=2, image_size=32
    )
    folder = tmp_path / "recipes"
    folder.mkdir()
    base = REPO / "configs" / "ImageNet-Classification" / "Base-RedNet-Cls.yaml"
    (folder / "tiny.yaml").write_text(RECIPE.format(base=base, root=data, lr=0.001))
    monkeypatch.setattr(shapes_pretrained, "RECIPE_DIR", folder)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    return folder


def _semantic_fpn():
    cfg = d2_involution.add_involution_config(get_cfg())
    cfg.merge_from_file(str(REPO / "configs" / "Shapes" / "semantic_fpn_rednet26_fpn.yaml"))
    cfg.MODEL.WEIGHTS = ""
    return build_model(cfg)


def test_first_load_pretrains_then_the_cache_is_used(recipes, tmp_path):
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    model = _semantic_fpn()
    untrained = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    DetectionCheckpointer(model).load("shapes-pretrained://tiny")
    # The global random state is as before: a run that pre-trains continues as one with a cache.
    assert torch.equal(torch.rand(3), expected_next)

    cached = tmp_path / "datasets" / "shapes" / "pretrained" / "tiny"
    backbone = torch.load(cached / "backbone.pth", weights_only=False)["model"]
    assert (cached / "train" / "log.txt").is_file() and (cached / "result.json").is_file()
    assert not list((cached / "train").glob("model_*.pth"))  # checkpoints are not kept
    state = model.state_dict()
    compared = 0
    for key, value in backbone.items():
        target = "backbone.bottom_up." + key
        assert torch.equal(state[target], torch.as_tensor(value)), key
        compared += 1
    assert compared > 100
    changed = [
        k
        for k in backbone
        if not torch.equal(untrained["backbone.bottom_up." + k], state["backbone.bottom_up." + k])
    ]
    assert len(changed) > 100  # the weights came from the file, not the init

    stamp = (cached / "backbone.pth").stat().st_mtime_ns
    assert shapes_pretrained.shapes_pretrained_backbone("tiny") == str(cached / "backbone.pth")
    assert (cached / "backbone.pth").stat().st_mtime_ns == stamp  # not trained again


def test_an_edited_recipe_is_trained_again(recipes, tmp_path):
    first = torch.load(shapes_pretrained.shapes_pretrained_backbone("tiny"), weights_only=False)
    text = (recipes / "tiny.yaml").read_text().replace("BASE_LR: 0.001", "BASE_LR: 0.01")
    (recipes / "tiny.yaml").write_text(text)
    second = torch.load(shapes_pretrained.shapes_pretrained_backbone("tiny"), weights_only=False)
    key = "res5.0.conv3.weight"
    assert not torch.equal(
        torch.as_tensor(first["model"][key]), torch.as_tensor(second["model"][key])
    )


def test_unknown_recipe_names_the_known_ones(recipes):
    with pytest.raises(ValueError, match=r"no recipe .*known: \['tiny'\]"):
        shapes_pretrained.shapes_pretrained_backbone("rednet999")
    with pytest.raises(ValueError, match="no recipe"):
        shapes_pretrained.shapes_pretrained_backbone("../tiny")
