"""``DefaultPredictor`` on a RedNet Mask R-CNN (configs/Shapes/mask_rcnn_rednet26_fpn.yaml), called
directly, on a BGR image of odd size.

The weights are random (norm statistics randomised, so every block matters) and the score
threshold is 0, so the model always returns ``TEST.DETECTIONS_PER_IMAGE`` instances. Checked: the
output structure, boxes and masks at the original odd size, and equality with the model called by
hand on the same image resized and converted to the config's RGB format (a predictor that skipped
the channel flip or the resize would differ).
"""

from pathlib import Path

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from random_weights import randomize_norms

from d2_involution import add_involution_config

REPO = Path(__file__).resolve().parents[1]
MASK_RCNN = REPO / "configs" / "Shapes" / "mask_rcnn_rednet26_fpn.yaml"


def test_default_predictor_on_rednet_mask_rcnn(tmp_path):
    cfg = add_involution_config(get_cfg())
    cfg.merge_from_file(str(MASK_RCNN))
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    torch.manual_seed(0)
    model = randomize_norms(build_model(cfg))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("random")
    cfg.MODEL.WEIGHTS = str(tmp_path / "random.pth")
    predictor = DefaultPredictor(cfg)
    rng = np.random.default_rng(0)
    image_bgr = rng.integers(0, 256, (83, 117, 3), dtype=np.uint8)
    instances = predictor(image_bgr)["instances"].to("cpu")

    assert cfg.INPUT.FORMAT == "RGB" and instances.image_size == (83, 117)
    assert len(instances) == cfg.TEST.DETECTIONS_PER_IMAGE
    assert set(instances.get_fields()) == {"pred_boxes", "scores", "pred_classes", "pred_masks"}
    boxes = instances.pred_boxes.tensor
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 117).all() and (boxes[:, 3] <= 83).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert tuple(instances.pred_masks.shape) == (len(instances), 83, 117)
    assert instances.pred_masks.dtype == torch.bool and instances.pred_masks.any()
    assert (instances.scores[:-1] >= instances.scores[1:]).all()
    assert instances.pred_classes.max() < cfg.MODEL.ROI_HEADS.NUM_CLASSES

    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    rgb = resize.get_transform(image_bgr).apply_image(image_bgr[:, :, ::-1])
    tensor = torch.as_tensor(rgb.astype("float32").transpose(2, 0, 1))
    with torch.no_grad():
        by_hand = predictor.model([{"image": tensor, "height": 83, "width": 117}])[0]
    by_hand = by_hand["instances"].to("cpu")
    torch.testing.assert_close(by_hand.pred_boxes.tensor, boxes)
    torch.testing.assert_close(by_hand.scores, instances.scores)
