"""Detectron2's own evaluators on the shapes datasets: ground truth fed back scores perfectly."""

import numpy as np
import pytest
import torch
from detectron2.evaluation import COCOEvaluator, SemSegEvaluator
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image
from pycocotools import mask as mask_util

from d2_involution import compat  # registers the datasets, fixes detectron2 v0.6


def build_coco_evaluator(dataset_name: str) -> COCOEvaluator:
    """COCO AP as train_net.py computes it (pycocotools when detectron2._C is missing)."""
    return COCOEvaluator(dataset_name, use_fast_impl=compat.HAS_COMPILED_OPS)


def _ground_truth_instances(d: dict, shift: int = 0) -> Instances:
    """The annotations of a dataset dict as model predictions, optionally shifted right."""
    h, w = d["height"], d["width"]
    annos = d["annotations"]
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos]
    masks = np.stack([mask_util.decode(a["segmentation"]) for a in annos]).astype(bool)
    instances = Instances((h, w))
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32) + shift)
    instances.scores = torch.ones(len(annos))
    instances.pred_classes = torch.tensor([a["category_id"] for a in annos])
    instances.pred_masks = torch.from_numpy(np.roll(masks, shift, axis=2))
    return instances


def _coco_results(dicts, shift: int) -> dict:
    evaluator = build_coco_evaluator("shapes_val")
    evaluator.reset()
    for d in dicts:
        evaluator.process(
            [{"image_id": d["image_id"]}], [{"instances": _ground_truth_instances(d, shift)}]
        )
    return evaluator.evaluate()


def test_coco_evaluator_scores_ground_truth_at_100(shapes_val_dicts):
    results = _coco_results(shapes_val_dicts, shift=0)
    for task in ("bbox", "segm"):
        assert results[task]["AP"] == pytest.approx(100.0), task
        assert results[task]["AP75"] == pytest.approx(100.0), task


def test_coco_evaluator_penalises_shifted_predictions(shapes_val_dicts):
    results = _coco_results(shapes_val_dicts, shift=6)
    for task in ("bbox", "segm"):
        assert 0.0 < results[task]["AP"] < 95.0, (task, results[task]["AP"])


def _sem_seg_results(dicts, predict) -> dict:
    evaluator = SemSegEvaluator("shapes_sem_seg_val", distributed=False)
    evaluator.reset()
    for d in dicts:
        label = np.array(Image.open(d["sem_seg_file_name"]), dtype=np.int64)
        logits = torch.nn.functional.one_hot(torch.from_numpy(predict(label)), 6)
        evaluator.process(
            [{"file_name": d["file_name"]}], [{"sem_seg": logits.permute(2, 0, 1).float()}]
        )
    return evaluator.evaluate()["sem_seg"]


def test_sem_seg_evaluator_scores_ground_truth_at_100(shapes_sem_seg_val_dicts):
    results = _sem_seg_results(shapes_sem_seg_val_dicts, lambda label: label)
    assert results["mIoU"] == pytest.approx(100.0)
    assert results["pACC"] == pytest.approx(100.0)


def test_sem_seg_evaluator_penalises_missing_shapes(shapes_sem_seg_val_dicts):
    """Predicting only circles (and background elsewhere) leaves 4 of 6 classes at IoU 0."""
    results = _sem_seg_results(shapes_sem_seg_val_dicts, lambda label: np.where(label == 1, 1, 0))
    assert results["IoU-circle"] == pytest.approx(100.0)
    assert results["IoU-star"] == 0.0
    assert results["mIoU"] < 100.0 * 2 / 6 + 10


def test_evaluators_build_before_the_data_exists(tmp_path, monkeypatch):
    """Building an evaluator is a first use: it generates the split on demand."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    monkeypatch.setenv("D2INV_SHAPES_VAL_IMAGES", "2")
    monkeypatch.setenv("D2INV_SHAPES_IMAGE_SIZE", "64")
    coco = build_coco_evaluator("shapes_val")
    assert sorted(coco._coco_api.getImgIds()) == [1, 2]
    assert (tmp_path / "shapes" / "val" / "instances.json").is_file()
    sem = SemSegEvaluator("shapes_sem_seg_val", distributed=False)
    assert len(sem.input_file_to_gt_file) == 2
    assert all(f.startswith(str(tmp_path)) for f in sem.input_file_to_gt_file)
