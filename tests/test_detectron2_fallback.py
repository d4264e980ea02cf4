"""The installed detectron2, made usable by d2_involution.compat, works end to end.

A stock Detectron2 Mask R-CNN R-50-FPN (configs/Detectron2-Baselines: detectron2's own defaults
plus the model settings of its model-zoo Mask R-CNN R-50-FPN 1x, which the registry copy of v0.6
does not ship) trains one iteration on shapes_train with DefaultTrainer and runs inference, on CPU,
from random initialisation (no download).
"""

import json
import math
import os
import sys
from pathlib import Path

import cv2
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultPredictor, DefaultTrainer

from d2_involution import compat  # fixes the detectron2 v0.6 fallback (tests/conftest.py: first)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_net  # noqa: E402


def _stock_mask_rcnn_cfg(output_dir: str):
    cfg = get_cfg()
    cfg.merge_from_file(
        str(REPO / "configs" / "Detectron2-Baselines" / "mask_rcnn_R_50_FPN_1x.yaml")
    )
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(MetadataCatalog.get("shapes_train").thing_classes)
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.DATASETS.TRAIN = ("shapes_train",)
    cfg.DATASETS.TEST = ()
    cfg.INPUT.MASK_FORMAT = "bitmask"  # shapes masks are exact RLE
    cfg.INPUT.MIN_SIZE_TRAIN = (128,)
    cfg.INPUT.MAX_SIZE_TRAIN = 128
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 128
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 0.001
    cfg.SOLVER.MAX_ITER = 1
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    cfg.OUTPUT_DIR = output_dir
    return cfg


def test_stock_mask_rcnn_trains_one_iteration_and_predicts(tmp_path, shapes_train_dicts):
    torch.manual_seed(0)
    cfg = _stock_mask_rcnn_cfg(str(tmp_path))
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()

    assert trainer.iter == cfg.SOLVER.MAX_ITER == 1  # one step ran (iter is advanced after it)
    latest = {k: v[0] for k, v in trainer.storage.latest().items()}
    losses = {k: v for k, v in latest.items() if k.startswith("loss_")}
    assert set(losses) == {
        "loss_cls",
        "loss_box_reg",
        "loss_mask",
        "loss_rpn_cls",
        "loss_rpn_loc",
    }
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert latest["total_loss"] == pytest.approx(sum(losses.values()), rel=1e-4)
    with open(os.path.join(str(tmp_path), "metrics.json")) as f:
        assert "total_loss" in json.loads(f.readline())

    predictor = DefaultPredictor(cfg)
    predictor.model.load_state_dict(trainer.model.state_dict())
    image = cv2.imread(DatasetCatalog.get("shapes_val")[0]["file_name"])
    instances = predictor(image)["instances"]
    assert len(instances) > 0
    assert tuple(instances.pred_masks.shape[1:]) == image.shape[:2]
    assert torch.isfinite(instances.pred_boxes.tensor).all()


@pytest.mark.skipif(compat.HAS_COMPILED_OPS, reason="detectron2._C is installed: no stand-in")
def test_missing_compiled_op_raises_a_clear_error(shapes_val_dicts, tmp_path):
    """The fast COCO evaluation is a CPU path into detectron2._C: it must fail loudly, and
    train_net.py's evaluator must avoid it."""
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, BoxMode, Instances

    def predictions(d):
        instances = Instances((d["height"], d["width"]))
        boxes = [
            BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in d["annotations"]
        ]
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.scores = torch.ones(len(boxes))
        instances.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
        return {"instances": instances}

    for evaluator in (
        COCOEvaluator("shapes_val", use_fast_impl=True),
        train_net.build_evaluator(get_cfg(), "shapes_val", str(tmp_path)),
    ):
        evaluator.reset()
        image_ids = [d["image_id"] for d in shapes_val_dicts[:2]]
        for d in shapes_val_dicts[:2]:
            evaluator.process([{"image_id": d["image_id"]}], [predictions(d)])
        if evaluator._use_fast_impl:
            with pytest.raises(RuntimeError, match=r"detectron2\._C\.\w+ is not available"):
                evaluator.evaluate(img_ids=image_ids)
        else:
            assert evaluator.evaluate(img_ids=image_ids)["bbox"]["AP"] == pytest.approx(100.0)

    import detectron2._C as compiled

    with pytest.raises(RuntimeError, match="build detectron2 from source"):
        compiled.nms_rotated
