"""Converting the official RedNet checkpoints: formats, names, layouts and the same function.

Random checkpoints are written in the official layouts (tests/official_reference.py), converted,
loaded with Detectron2's DetectionCheckpointer into the models of the training configs that
evaluate them (configs/COCO-*, configs/Cityscapes; RedNet-26 to stay fast), and compared with an
independent functional model of the official networks.
"""

import math
import os
import sys

import pytest
import torch

import d2_involution  # noqa: F401  (before detectron2)
from d2_involution import compat
from d2_involution.checkpoint import (
    anchor_permutation,
    convert_official_checkpoint,
    detect_source,
    load_backbone_weights,
    read_official_file,
)
from d2_involution.classification import RedNetClassifier
from d2_involution.modeling import build_rednet

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import official_reference as R  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

if R.KEYS_JSON is None:
    pytest.skip(
        "shared/reference/official_rednet_keys.json (the official key/shape list) is not available",
        allow_module_level=True,
    )

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 5
DEPTH = 26


def official_cfg(name: str, **overrides):
    """The training config ``name`` (under configs/) that evaluates the official checkpoint."""
    cfg = get_cfg()
    d2_involution.add_involution_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", name))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.REDNET.DEPTH = DEPTH
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.RETINANET.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_CLASSES
    for k, v in overrides.items():
        node = cfg
        *path, leaf = k.split(".")
        for p in path:
            node = getattr(node, p)
        setattr(node, leaf, v)
    return cfg


def write(tmp_path, kind: str, num_classes=NUM_CLASSES, seed=0) -> tuple:
    sd = R.random_state_dict(R.official_layout(kind, DEPTH, num_classes), seed=seed)
    path = str(tmp_path / f"{kind}.pth")
    R.write_openmmlab(path, sd)
    return path, sd


def load_exactly(model, path: str):
    """Load like DetectionCheckpointer.load and return its incompatible-keys record.

    BatchNorm step counters are left out of the missing keys: conversion drops them (they are not
    weights), and detectron2 main's FrozenBatchNorm2d keeps one buffer for them where v0.6 has none.
    """
    ckpt = DetectionCheckpointer(model)
    inc = compat.load_checkpoint_into_model(ckpt, compat.read_checkpoint_file(ckpt, path))
    missing = [k for k in inc.missing_keys if not k.endswith(".num_batches_tracked")]
    return inc._replace(missing_keys=missing)


def assert_close(ours, ref, what: str, rtol: float = 2e-4):
    scale = ref.abs().max().item() + 1e-6
    err = (ours - ref).abs().max().item()
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    assert err <= rtol * scale, f"{what}: max abs error {err:.3g} vs output scale {scale:.3g}"


def converted_model(tmp_path, kind: str, config: str, check_cfg: bool = False):
    src, sd = write(tmp_path, kind)
    dst = str(tmp_path / f"{kind}_d2.pth")
    cfg = official_cfg(config)
    report = convert_official_checkpoint(src, dst, cfg=cfg if check_cfg else None)
    model = build_model(cfg).eval()
    inc = load_exactly(model, dst)
    assert not inc.missing_keys, inc.missing_keys
    assert not inc.unexpected_keys, inc.unexpected_keys
    assert not inc.incorrect_shapes, inc.incorrect_shapes
    assert report.no_counterpart == [] and report.shape_mismatch == []
    return model, R.Weights(sd), report


IMAGE = torch.Generator().manual_seed(7)


def image(h=64, w=64):
    return torch.randn(1, 3, h, w, generator=IMAGE)


# ------------------------------------------------------------------------------------------------
# Detectors
# ------------------------------------------------------------------------------------------------
def test_faster_rcnn_involution_neck_and_head_same_function(tmp_path):
    model, w, report = converted_model(
        tmp_path,
        "faster_rcnn_neck_head",
        "COCO-Detection/faster_rcnn_rednet50_involution_fpn_head_1x.yaml",
        check_cfg=True,
    )
    assert report.missing_in_checkpoint == []
    x = image()
    with torch.no_grad():
        feats = model.backbone(x)
        ref_c = R.rednet_ref(w, x)
        ref_p = R.fpn_ref(w, ref_c, num_outs=5)
        for i, name in enumerate(["p2", "p3", "p4", "p5", "p6"]):
            assert_close(feats[name], ref_p[i], f"FPN {name}")
        levels = [feats[f] for f in model.proposal_generator.in_features]
        obj, deltas = model.proposal_generator.rpn_head(levels)
        for i, (ro, rd) in enumerate(R.rpn_head_ref(w, ref_p)):
            assert_close(obj[i], ro, f"RPN objectness level {i}")
            assert_close(deltas[i], rd, f"RPN deltas level {i}")
        rois = torch.randn(6, 256, 7, 7, generator=IMAGE)
        scores, box_deltas = model.roi_heads.box_predictor(model.roi_heads.box_head(rois))
        ref_scores, ref_deltas = R.bbox_head_ref(w, rois)
        assert_close(scores, ref_scores, "box head cls_score")
        assert_close(box_deltas, ref_deltas, "box head bbox_pred")


def test_rpn_anchor_order_and_deltas_match_mmdet(tmp_path):
    """Channel a of the converted RPN belongs to the same anchor box in both frameworks."""
    model, w, _ = converted_model(
        tmp_path, "faster_rcnn", "COCO-Detection/faster_rcnn_rednet50_fpn_1x.yaml"
    )
    x = image()
    with torch.no_grad():
        feats = model.backbone(x)
        levels = [feats[f] for f in model.proposal_generator.in_features]
        anchors = model.proposal_generator.anchor_generator(levels)
        obj, deltas = model.proposal_generator.rpn_head(levels)
        ref = R.rpn_head_ref(w, R.fpn_ref(w, R.rednet_ref(w, x), num_outs=5))
    for i, (f, a) in enumerate(zip(levels, anchors)):
        stride = 4 * 2**i
        ref_anchors = R.mmdet_anchors(stride, [8], [0.5, 1.0, 2.0], *f.shape[-2:])
        assert torch.allclose(a.tensor.double(), ref_anchors, atol=1e-3), f"anchors level {i}"
        # Detectron2 flattens (N, A, H, W) -> (N, H*W*A): the same (location, anchor) order.
        ours = obj[i].permute(0, 2, 3, 1).reshape(-1)
        theirs = ref[i][0].permute(0, 2, 3, 1).reshape(-1)
        assert_close(ours, theirs, f"objectness per anchor, level {i}")
        boxes = model.proposal_generator.box2box_transform.apply_deltas(
            deltas[i].view(1, -1, 4, *f.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(-1, 4),
            a.tensor,
        )
        ref_d = ref[i][1].view(1, -1, 4, *f.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(-1, 4)
        ref_boxes = R.mmdet_delta2bbox(ref_anchors, ref_d.double(), (1.0, 1.0, 1.0, 1.0))
        assert_close(boxes.double(), ref_boxes, f"RPN proposals level {i}", rtol=1e-4)


def test_box_head_class_and_delta_layout_match_mmdet(tmp_path):
    """Background last, class-major deltas with target stds (0.1, 0.1, 0.2, 0.2): the converted
    box predictor's boxes and scores are mmdet's for every class."""
    model, w, _ = converted_model(
        tmp_path, "faster_rcnn_neck", "COCO-Detection/faster_rcnn_rednet50_involution_fpn_1x.yaml"
    )
    rois = torch.randn(8, 256, 7, 7, generator=IMAGE)
    xy = torch.rand(8, 2, generator=IMAGE) * 300
    proposals_xyxy = torch.cat([xy, xy + 20 + torch.rand(8, 2, generator=IMAGE) * 200], 1)
    proposals = Instances((600, 600), proposal_boxes=Boxes(proposals_xyxy))
    predictor = model.roi_heads.box_predictor
    with torch.no_grad():
        preds = predictor(model.roi_heads.box_head(rois))
        probs = predictor.predict_probs(preds, [proposals])[0]
        boxes = predictor.predict_boxes(preds, [proposals])[0].view(8, NUM_CLASSES, 4)
        ref_cls, ref_reg = R.bbox_head_ref(w, rois)
    ref_probs = ref_cls.softmax(-1)
    # mmdet: foreground classes are columns 0..K-1, background is column K (the last).
    assert_close(probs[:, :NUM_CLASSES], ref_probs[:, :NUM_CLASSES], "foreground scores")
    assert_close(probs[:, NUM_CLASSES], ref_probs[:, NUM_CLASSES], "background score")
    for k in range(NUM_CLASSES):
        ref_boxes = R.mmdet_delta2bbox(
            proposals_xyxy.double(), ref_reg[:, 4 * k : 4 * k + 4].double(), (0.1, 0.1, 0.2, 0.2)
        )
        assert_close(boxes[:, k].double(), ref_boxes, f"class {k} boxes", rtol=1e-4)


def test_mask_rcnn_involution_heads_same_function(tmp_path):
    model, w, _ = converted_model(
        tmp_path,
        "mask_rcnn_neck_head",
        "COCO-InstanceSegmentation/mask_rcnn_rednet50_involution_fpn_head_1x.yaml",
    )
    rois = torch.randn(3, 256, 14, 14, generator=IMAGE)
    with torch.no_grad():
        assert_close(model.roi_heads.mask_head.layers(rois), R.mask_head_ref(w, rois), "mask head")
    # The eval config feeds RGB normalised as OpenMMLab did, and the full inference path runs.
    assert model.input_format == "RGB"
    assert model.pixel_mean.flatten().tolist() == pytest.approx([123.675, 116.28, 103.53])
    assert model.pixel_std.flatten().tolist() == pytest.approx([58.395, 57.12, 57.375])
    img = torch.randint(0, 256, (3, 80, 96), generator=IMAGE, dtype=torch.uint8)
    with torch.no_grad():
        out = model([{"image": img, "height": 80, "width": 96}])[0]["instances"]
    assert out.image_size == (80, 96) and out.has("pred_masks")


def test_mask_rcnn_conv_heads_same_function(tmp_path):
    model, w, _ = converted_model(
        tmp_path, "mask_rcnn", "COCO-InstanceSegmentation/mask_rcnn_rednet50_fpn_1x.yaml"
    )
    rois = torch.randn(3, 256, 14, 14, generator=IMAGE)
    with torch.no_grad():
        assert_close(model.roi_heads.mask_head.layers(rois), R.mask_head_ref(w, rois), "mask head")
        x = image()
        feats = model.backbone(x)
        ref_p = R.fpn_ref(w, R.rednet_ref(w, x), num_outs=5)
        assert_close(feats["p3"], ref_p[1], "conv FPN p3")


def test_retinanet_anchor_permutation(tmp_path):
    """Each Detectron2 anchor's class logits and box come from the mmdet channels of the anchor
    with the same box (mmdet: ratio-major, Detectron2: size-major)."""
    model, w, report = converted_model(
        tmp_path, "retinanet_neck", "COCO-Detection/retinanet_rednet50_involution_fpn_1x.yaml"
    )
    assert any("permuted" in t for t in report.transforms)
    x = image(64, 64)
    with torch.no_grad():
        feats = model.backbone(x)
        levels = [feats[f] for f in model.head_in_features]
        anchors = model.anchor_generator(levels)
        logits, bbox_reg = model.head(levels)
        ref_p = R.fpn_ref(w, R.rednet_ref(w, x), num_outs=5, start_level=1, extra="on_input")
        ref = R.retina_head_ref(w, ref_p)
    for i, name in enumerate(["p3", "p4", "p5", "p6", "p7"]):
        assert_close(feats[name], ref_p[i], f"RetinaNet FPN {name}")
    scales = [4 * 2 ** (k / 3) for k in range(3)]
    for i, (f, a) in enumerate(zip(levels, anchors)):
        h, wd = f.shape[-2:]
        ref_anchors = R.mmdet_anchors(8 * 2**i, scales, [0.5, 1.0, 2.0], h, wd).view(h * wd, 9, 4)
        ours_anchors = a.tensor.double().view(h * wd, 9, 4)
        # mmdet anchor index holding the same box as each Detectron2 anchor (first location).
        match = torch.cdist(ours_anchors[0], ref_anchors[0]).argmin(1)
        assert torch.allclose(ours_anchors, ref_anchors[:, match], atol=1e-2), f"level {i}"
        cls = logits[i].view(1, 9, NUM_CLASSES, h, wd)
        ref_cls = ref[i][0].view(1, 9, NUM_CLASSES, h, wd)[:, match]
        assert_close(cls, ref_cls, f"class logits per anchor, level {i}")
        reg = bbox_reg[i].view(1, 9, 4, h, wd)
        assert_close(reg, ref[i][1].view(1, 9, 4, h, wd)[:, match], f"box deltas, level {i}")


def test_anchor_permutation_is_size_major_from_ratio_major():
    # 3 sizes x 3 ratios: Detectron2 anchor (s=0, r=1) is mmdet anchor r*3+s = 3.
    assert anchor_permutation(9, 3) == [0, 3, 6, 1, 4, 7, 2, 5, 8]
    assert anchor_permutation(3, 1) == [0, 1, 2]  # the RPN: one size, nothing moves
    with pytest.raises(ValueError, match="multiple of num_scales"):
        anchor_permutation(9, 2)


# ------------------------------------------------------------------------------------------------
# Segmentation
# ------------------------------------------------------------------------------------------------
def test_semantic_fpn_involution_neck_same_function(tmp_path):
    model, w, _ = converted_model(
        tmp_path,
        "fpn_seg_neck",
        "Cityscapes/semantic_fpn_rednet50_involution_fpn_512x1024_80k.yaml",
    )
    x = image()
    with torch.no_grad():
        feats = model.backbone(x)
        ours = model.sem_seg_head.layers(feats)
        ref = R.fpn_seg_head_ref(w, R.fpn_ref(w, R.rednet_ref(w, x), num_outs=4))
    assert_close(ours, ref, "semantic FPN logits")


def test_upernet_same_function(tmp_path):
    # The official 512 channels, reduced to 128 here to keep the test fast (names are the same).
    layout = R.backbone_keys(DEPTH)
    layout.update(R.uper_head_keys(NUM_CLASSES, ch=128))
    sd = R.random_state_dict(layout, seed=5)
    src = R.write_openmmlab(str(tmp_path / "upernet.pth"), sd)
    cfg = official_cfg("Cityscapes/upernet_rednet50_512x1024_80k.yaml")
    cfg.MODEL.SEM_SEG_HEAD.UPERNET.CHANNELS = 128
    report = convert_official_checkpoint(src, str(tmp_path / "upernet_d2.pth"), cfg=cfg)
    assert report.no_counterpart == [] and report.missing_in_checkpoint == []
    model = build_model(cfg).eval()
    inc = load_exactly(model, str(tmp_path / "upernet_d2.pth"))
    assert not inc.missing_keys and not inc.unexpected_keys and not inc.incorrect_shapes
    w = R.Weights(sd)
    x = image()
    with torch.no_grad():
        ours = model.sem_seg_head.layers(model.backbone(x))
        ref = R.uper_head_ref(w, R.rednet_ref(w, x))
    assert_close(ours, ref, "UPerNet logits")
    assert any(dst.startswith("sem_seg_head.aux_") for _, dst in report.converted)


# ------------------------------------------------------------------------------------------------
# Classifiers (mmcls, PaddleClas)
# ------------------------------------------------------------------------------------------------
def _classifier_check(tmp_path, src, sd, layout):
    dst = str(tmp_path / "cls_d2.pth")
    report = convert_official_checkpoint(src, dst, target="classifier", depth=DEPTH)
    clf = RedNetClassifier(build_rednet(DEPTH, stem_involution_kernel=3), 10).eval()
    inc = load_exactly(clf, dst)
    assert not inc.missing_keys and not inc.unexpected_keys and not inc.incorrect_shapes
    x = image(64, 64)
    with torch.no_grad():
        assert_close(clf(x), R.classifier_ref(R.Weights(sd, layout), x), "classifier logits")
    return report


def test_mmcls_classifier_same_function(tmp_path):
    src, sd = write(tmp_path, "mmcls", num_classes=10)
    report = _classifier_check(tmp_path, src, sd, "openmmlab")
    assert report.source.framework == "mmcls" and report.source.stem_kernel == 3


def test_paddleclas_classifier_same_function(tmp_path):
    sd = R.random_state_dict(R.paddle_layout(DEPTH, num_classes=10), seed=3)
    src = R.write_pdparams(str(tmp_path / "RedNet26_pretrained.pdparams"), sd)
    report = _classifier_check(tmp_path, src, sd, "paddle")
    assert report.source.framework == "paddle"
    assert any("Paddle" in t for t in report.transforms)


def test_classifier_backbone_loads_into_detector_except_stem_kernel(tmp_path):
    src, sd = write(tmp_path, "mmcls", num_classes=1000)
    dst = str(tmp_path / "backbone.pth")
    report = convert_official_checkpoint(src, dst)
    assert report.target == "backbone"
    assert any("stem" in m and "7x7" in m for m in report.shape_mismatch)
    cfg = official_cfg("COCO-Detection/faster_rcnn_rednet50_fpn_1x.yaml")
    model = build_model(cfg)
    fit = load_backbone_weights(model, dst)
    assert sorted(t[0] for t in fit.not_fitting) == [
        "stem.involution.conv2.conv.bias",
        "stem.involution.conv2.conv.weight",
    ]
    assert fit.unused == []
    # Asking for the detectors' 7x7 stem leaves the 3x3 kernel generator out of the file.
    dst7 = str(tmp_path / "backbone7.pth")
    report7 = convert_official_checkpoint(src, dst7, stem_kernel=7)
    assert len(report7.shape_mismatch) == 2 and "left out" in report7.shape_mismatch[0]
    assert "stem.involution.conv2.conv.weight" not in torch.load(dst7)["model"]
    got = model.backbone.bottom_up.state_dict()
    assert torch.equal(
        got["res4.1.conv2.conv1.conv.weight"], sd["backbone.layer3.1.conv2.conv1.conv.weight"]
    )
    assert torch.equal(got["stem.bn.running_var"], sd["backbone.stem.2.running_var"])


# ------------------------------------------------------------------------------------------------
# Source detection and bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind,arch,neck,head",
    [
        ("faster_rcnn", "faster_rcnn", "conv", "conv"),
        ("mask_rcnn_neck", "mask_rcnn", "involution", "conv"),
        ("mask_rcnn_neck_head", "mask_rcnn", "involution", "involution"),
        ("retinanet", "retinanet", "conv", "conv"),
        ("fpn_seg", "semantic_fpn", "conv", None),
        ("upernet", "upernet", None, None),
        ("mmcls", "classifier", None, None),
    ],
)
def test_detect_source(kind, arch, neck, head):
    src = detect_source(R.random_state_dict(R.official_layout(kind, 38)))
    assert (src.arch, src.neck, src.head, src.depth) == (arch, neck, head, 38)
    assert src.stem_kernel == (3 if kind == "mmcls" else 7)


# Params(M) column of the official README (d-li14/involution, "Model Zoo"). mmcv counts only
# trainable parameters, so the detectors' frozen stem and layer1 (frozen_stages=1) are excluded.
OFFICIAL_PARAMS_M = [
    ("faster_rcnn", 31.6),
    ("faster_rcnn_neck", 29.5),
    ("faster_rcnn_neck_head", 29.0),
    ("mask_rcnn", 34.2),
    ("mask_rcnn_neck", 32.2),
    ("mask_rcnn_neck_head", 29.5),
    ("retinanet", 27.8),
    ("retinanet_neck", 26.3),
    ("fpn_seg", 18.5),
    ("fpn_seg_neck", 16.4),
    ("upernet", 56.4),
]


@pytest.mark.parametrize("kind,params_m", OFFICIAL_PARAMS_M)
def test_written_layouts_have_the_official_parameter_counts(kind, params_m):
    """The neck/head layouts written here (not in the JSON) reproduce the README's counts."""
    layout = R.official_layout(
        kind, 50, 19 if kind in ("fpn_seg", "fpn_seg_neck", "upernet") else 80
    )
    frozen = (
        ("backbone.stem.", "backbone.layer1.")
        if kind.startswith(("faster", "mask", "retina"))
        else ()
    )
    stats = ("running_mean", "running_var", "num_batches_tracked")
    count = sum(
        math.prod(shape)
        for k, shape in layout.items()
        if not k.endswith(stats) and not (frozen and k.startswith(frozen))
    )
    # Ten of the eleven round to the printed value; the involution-neck RetinaNet counts 26.246M
    # against a printed 26.3 (its key layout equals the conv-neck RetinaNet's up to the neck,
    # which is the same as the R-CNN involution neck that matches).
    assert abs(count / 1e6 - params_m) < 0.06


def test_classifier_layout_matches_reference_json():
    layout = R.official_layout("mmcls", 50)
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert sum(math.prod(s) for k, s in layout.items() if not k.endswith(stats)) == 15540806


def test_official_rednet50_keys_detected():
    sd = R.random_state_dict(R.official_keys("mmdet_rednet50_involution_fpn"))
    sd.update(R.random_state_dict(R.rpn_keys(False)))
    sd.update(R.random_state_dict(R.bbox_head_keys(80)))
    src = detect_source(sd)
    assert (src.arch, src.depth, src.neck, src.num_classes) == ("faster_rcnn", 50, "involution", 80)


def _no_file(path):
    return not os.path.exists(path)


def test_not_a_checkpoint(tmp_path):
    src = tmp_path / "notes.pth"
    src.write_text("this is a README, not weights\n")
    dst = str(tmp_path / "out.pth")
    with pytest.raises(ValueError, match="not a checkpoint"):
        convert_official_checkpoint(str(src), dst)
    assert _no_file(dst)


def test_truncated_file_keeps_existing_output(tmp_path):
    src, _ = write(tmp_path, "faster_rcnn")
    data = open(src, "rb").read()
    with open(src, "wb") as f:
        f.write(data[: len(data) // 2])
    dst = tmp_path / "out.pth"
    dst.write_bytes(b"previous")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        convert_official_checkpoint(src, str(dst))
    assert dst.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_unknown_layout(tmp_path):
    src = str(tmp_path / "resnet.pth")
    torch.save({"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7)}}, src)
    with pytest.raises(ValueError, match="unknown layout"):
        convert_official_checkpoint(src, str(tmp_path / "out.pth"))
    assert _no_file(str(tmp_path / "out.pth"))


def test_depth_mismatch_option_and_config(tmp_path):
    src, _ = write(tmp_path, "faster_rcnn")
    dst = str(tmp_path / "out.pth")
    with pytest.raises(ValueError, match="expected RedNet-50, but the checkpoint is RedNet-26"):
        convert_official_checkpoint(src, dst, depth=50)
    cfg = official_cfg(
        "COCO-Detection/faster_rcnn_rednet50_fpn_1x.yaml", **{"MODEL.REDNET.DEPTH": 101}
    )
    with pytest.raises(ValueError, match="MODEL.REDNET.DEPTH is 101"):
        convert_official_checkpoint(src, dst, cfg=cfg)
    assert _no_file(dst)


def test_wrong_config_architecture(tmp_path):
    src, _ = write(tmp_path, "faster_rcnn_neck")
    cfg = official_cfg(
        "COCO-Detection/faster_rcnn_rednet50_fpn_1x.yaml"
    )  # conv neck: involution names missing
    with pytest.raises(ValueError, match="does not fit this config"):
        convert_official_checkpoint(src, str(tmp_path / "out.pth"), cfg=cfg)


def test_pdparams_refuses_foreign_objects(tmp_path):
    import pickle

    src = tmp_path / "evil.pdparams"
    src.write_bytes(pickle.dumps({"stem.0.conv.weight": os.getcwd}, protocol=2))
    with pytest.raises(ValueError, match="not loaded for safety"):
        read_official_file(str(src))


class _Opaque:
    pass


def test_numpy_metadata_is_read_but_arbitrary_objects_are_not(tmp_path):
    import numpy as np

    sd = R.random_state_dict(R.official_layout("mmcls", DEPTH))
    src = str(tmp_path / "np_meta.pth")
    torch.save({"meta": {"epoch": np.int64(130), "lr": np.float32(0.8)}, "state_dict": sd}, src)
    assert convert_official_checkpoint(src).source.depth == DEPTH
    src = str(tmp_path / "obj_meta.pth")
    torch.save({"meta": {"hook": _Opaque()}, "state_dict": sd}, src)
    with pytest.raises(ValueError, match="not loaded for safety"):
        convert_official_checkpoint(src, str(tmp_path / "out.pth"))
    assert _no_file(str(tmp_path / "out.pth"))


def test_detectron2_checkpoint_is_rejected(tmp_path):
    src = str(tmp_path / "d2.pth")
    torch.save({"model": {"backbone.bottom_up.stem.conv1.conv.weight": torch.zeros(1)}}, src)
    with pytest.raises(ValueError, match="Detectron2 checkpoint"):
        convert_official_checkpoint(src, str(tmp_path / "out.pth"))


def test_class_order_from_meta(tmp_path):
    from detectron2.data import MetadataCatalog

    coco = list(MetadataCatalog.get("coco_2017_val").thing_classes)
    sd = R.random_state_dict(R.official_layout("faster_rcnn", DEPTH, 80))
    src = R.write_openmmlab(str(tmp_path / "a.pth"), sd, meta={"CLASSES": tuple(coco)})
    assert "same order" in convert_official_checkpoint(src).class_order
    swapped = [coco[1], coco[0]] + coco[2:]
    src = R.write_openmmlab(str(tmp_path / "b.pth"), sd, meta={"CLASSES": tuple(swapped)})
    assert "another order (index 0: 'bicycle'" in convert_official_checkpoint(src).class_order


def test_command_line(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import convert_official_weights as tool

    src, _ = write(tmp_path, "retinanet")
    dst = str(tmp_path / "retina_d2.pth")
    assert tool.main([src, dst, "--depth", str(DEPTH)]) == 0
    out = capsys.readouterr().out
    assert "mmdet retinanet, RedNet-26" in out and "permuted" in out and "no counterpart (0)" in out
    assert os.path.exists(dst)
    assert tool.main([src, str(tmp_path / "x.pth"), "--depth", "50"]) == 1
    err = capsys.readouterr().err
    assert "RedNet-26" in err and "nothing written" in err
    assert _no_file(str(tmp_path / "x.pth"))
