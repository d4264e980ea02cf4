"""tools/demo.py: inputs from files/folders/globs, predictions as JSON (RLE masks), pictures."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.structures import Boxes, Instances
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("d2inv_demo", REPO / "tools" / "demo.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


@pytest.fixture()
def image_dir(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for name in ("b.png", "a.jpg", "notes.txt"):
        if name.endswith(".txt"):
            (folder / name).write_text("not an image")
        else:
            Image.fromarray(rng.randint(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_collect_inputs_files_folders_globs(image_dir):
    assert demo.collect_inputs([str(image_dir)]) == [
        str(image_dir / "a.jpg"),
        str(image_dir / "b.png"),
    ]
    assert demo.collect_inputs([str(image_dir / "*.png"), str(image_dir / "a.jpg")]) == [
        str(image_dir / "b.png"),
        str(image_dir / "a.jpg"),
    ]
    with pytest.raises(ValueError, match="--input"):
        demo.collect_inputs([str(image_dir / "missing*.png")])


def test_confidence_threshold_is_checked():
    args = demo.get_parser().parse_args(
        ["--config-file", "x.yaml", "--input", "a", "--output", "o", "--confidence-threshold", "2"]
    )
    with pytest.raises(ValueError, match="confidence-threshold"):
        demo.setup_cfg(args)


def test_instances_to_json_round_trips_masks():
    inst = Instances((20, 30))
    inst.pred_boxes = Boxes(torch.tensor([[1.0, 2.0, 11.0, 12.0]]))
    inst.scores = torch.tensor([0.75])
    inst.pred_classes = torch.tensor([2])
    mask = torch.zeros(1, 20, 30, dtype=torch.bool)
    mask[0, 2:12, 1:11] = True
    inst.pred_masks = mask
    (record,) = demo.instances_to_json(inst, ["circle", "square", "triangle"])
    assert record["bbox"] == [1.0, 2.0, 11.0, 12.0]
    assert record["category_name"] == "triangle" and record["score"] == 0.75
    decoded = mask_util.decode(
        {
            "size": record["segmentation"]["size"],
            "counts": record["segmentation"]["counts"].encode(),
        }
    )
    assert np.array_equal(decoded.astype(bool), mask[0].numpy())
    json.dumps(record)


def test_demo_untrained_mask_rcnn_writes_pictures_and_json(image_dir, tmp_path):
    """An untrained Shapes Mask R-CNN with threshold 0 returns boxes and masks for each image."""
    out = tmp_path / "out"
    records = demo.main(
        [
            "--config-file",
            str(REPO / "configs" / "Shapes" / "mask_rcnn_rednet26_fpn.yaml"),
            "--input",
            str(image_dir),
            "--output",
            str(out),
            "--confidence-threshold",
            "0.0",
            "--opts",
            "MODEL.WEIGHTS",
            "",
            "MODEL.DEVICE",
            "cpu",
        ]
    )
    assert json.loads((out / "predictions.json").read_text()) == records
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png"]
    for record in records:
        assert (record["height"], record["width"]) == (48, 64)
        assert record["instances"]
        for inst in record["instances"]:
            assert inst["segmentation"]["size"] == [48, 64]
            assert inst["category_name"] in ("circle", "square", "triangle", "ellipse", "star")


def test_save_sem_seg_writes_class_indices(tmp_path):
    scores = torch.zeros(6, 4, 5)
    scores[3, :2] = 1.0
    labels = demo.save_sem_seg(scores, str(tmp_path / "s.png"))
    saved = np.array(Image.open(tmp_path / "s.png"))
    assert saved.dtype == np.uint8 and np.array_equal(saved, labels)
    assert (saved[:2] == 3).all() and (saved[2:] == 0).all()
