"""Every Detectron2 config under configs/ loads and builds; each meta-architecture trains a step.

Also the training pieces train_net.py adds to Detectron2: the poly LR schedule, whole-model
gradient clipping, evaluators by dataset and the semantic-segmentation augmentation.
"""

import math
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator, SemSegEvaluator
from detectron2.modeling import ResNet, build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from d2_involution import add_involution_config
from d2_involution.layers import Involution
from d2_involution.modeling import RedNetStem
from d2_involution.solver import (
    PolyParamScheduler,
    build_lr_scheduler,
    build_optimizer,
    clip_full_model_gradients,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from train_net import build_evaluator, build_sem_seg_train_aug  # noqa: E402

CONFIG_DIR = REPO / "configs"
# Classification configs are not Detectron2 model configs (their own trainer reads them).
NOT_DETECTRON2 = ("ImageNet-Classification", "Shapes-Classification")
ALL_CONFIGS = sorted(
    str(p.relative_to(CONFIG_DIR))
    for p in CONFIG_DIR.rglob("*.yaml")
    if not any(part in NOT_DETECTRON2 for part in p.relative_to(CONFIG_DIR).parts)
)


def load_cfg(name: str, *opts: str) -> CfgNode:
    cfg = get_cfg()
    add_involution_config(cfg)
    cfg.merge_from_file(str(CONFIG_DIR / name))
    cfg.merge_from_list(list(opts))
    return cfg


def test_config_inventory():
    """The paper's table rows and the Shapes variants of every meta-architecture exist."""
    expected = [
        "COCO-Detection/faster_rcnn_rednet50_fpn_1x.yaml",
        "COCO-Detection/faster_rcnn_rednet50_involution_fpn_1x.yaml",
        "COCO-Detection/faster_rcnn_rednet50_involution_fpn_head_1x.yaml",
        "COCO-InstanceSegmentation/mask_rcnn_rednet50_fpn_1x.yaml",
        "COCO-InstanceSegmentation/mask_rcnn_rednet50_involution_fpn_1x.yaml",
        "COCO-InstanceSegmentation/mask_rcnn_rednet50_involution_fpn_head_1x.yaml",
        "COCO-Detection/retinanet_rednet50_fpn_1x.yaml",
        "COCO-Detection/retinanet_rednet50_involution_fpn_1x.yaml",
        "Cityscapes/semantic_fpn_rednet50_512x1024_80k.yaml",
        "Cityscapes/semantic_fpn_rednet50_involution_fpn_512x1024_80k.yaml",
        "Cityscapes/upernet_rednet50_512x1024_80k.yaml",
    ]
    for depth in (26, 38, 101, 152):
        expected.append(f"COCO-Detection/faster_rcnn_rednet{depth}_fpn_1x.yaml")
        expected.append(f"COCO-InstanceSegmentation/mask_rcnn_rednet{depth}_fpn_1x.yaml")
    missing = [name for name in expected if name not in ALL_CONFIGS]
    assert not missing, missing
    metas = {load_cfg(n).MODEL.META_ARCHITECTURE for n in ALL_CONFIGS if n.startswith("Shapes/")}
    assert metas == {"GeneralizedRCNN", "RetinaNet", "SemanticSegmentor"}


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_loads_and_builds(name: str):
    cfg = load_cfg(name, "MODEL.DEVICE", "cpu")
    assert cfg.VERSION == 2
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE
    bottom_up = getattr(model.backbone, "bottom_up", model.backbone)
    assert isinstance(bottom_up, ResNet)
    assert isinstance(bottom_up.stem, RedNetStem) == ("rednet" in cfg.MODEL.BACKBONE.NAME)


COCO_CONFIGS = [n for n in ALL_CONFIGS if n.startswith("COCO-")]


@pytest.mark.parametrize("name", COCO_CONFIGS)
def test_coco_configs_follow_official_training(name: str):
    """FREEZE_AT 2, frozen-statistics BN, SGD 1x schedule with the official LR and clipping."""
    cfg = load_cfg(name)
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 2
    assert cfg.MODEL.REDNET.NORM == "FrozenStatsBN"
    assert cfg.MODEL.REDNET.STEM_INVOLUTION_KERNEL == 7
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.MAX_ITER == 90000
    assert tuple(cfg.SOLVER.STEPS) == (60000, 80000)
    assert (cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.WARMUP_FACTOR) == (2000, 0.001)
    assert (cfg.SOLVER.MOMENTUM, cfg.SOLVER.WEIGHT_DECAY) == (0.9, 1e-4)
    involution_neck = "involution" in cfg.MODEL.BACKBONE.NAME
    assert involution_neck == ("involution" in name)
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if "retinanet" in name and involution_neck:
        assert cfg.SOLVER.BASE_LR == 0.01
        assert (clip.ENABLED, clip.CLIP_TYPE, clip.CLIP_VALUE) == (True, "full_model", 40.0)
    elif "fpn_head" in name:
        assert cfg.MODEL.RPN.HEAD_NAME == "InvolutionRPNHead"
        assert (clip.ENABLED, clip.CLIP_TYPE, clip.CLIP_VALUE) == (True, "full_model", 5.0)
        if cfg.MODEL.MASK_ON:
            assert cfg.MODEL.ROI_MASK_HEAD.NAME == "InvolutionMaskHead"
    else:
        assert not clip.ENABLED
        assert cfg.SOLVER.BASE_LR == (0.01 if "retinanet" in name else 0.02)


@pytest.mark.parametrize("name", [n for n in ALL_CONFIGS if n.startswith("Cityscapes/")])
def test_cityscapes_configs(name: str):
    cfg = load_cfg(name)
    assert cfg.MODEL.REDNET.NORM == "SyncBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 19
    assert cfg.DATASETS.TRAIN == ("cityscapes_fine_sem_seg_train",)
    assert tuple(cfg.INPUT.CROP.SIZE) == (512, 1024) and cfg.INPUT.CROP.ENABLED
    assert cfg.SOLVER.MAX_ITER == 80000 and cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR"
    if "upernet" in name:
        up = cfg.MODEL.SEM_SEG_HEAD.UPERNET
        assert up.CHANNELS == 512 and up.AUX_IN_FEATURE == "res4" and up.AUX_LOSS_WEIGHT == 0.4
        assert list(up.POOL_SCALES) == [1, 2, 3, 6]
    else:
        assert cfg.MODEL.SEM_SEG_HEAD.NAME == "SemSegFPNHead"
        assert cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM == 128


# --- forward + backward of each meta-architecture, an image without objects included ---------

STEP_CONFIGS = [
    "Shapes/faster_rcnn_rednet26_fpn.yaml",
    "Shapes/mask_rcnn_rednet26_involution_fpn_head.yaml",
    "Shapes/retinanet_rednet26_involution_fpn.yaml",
    "Shapes/semantic_fpn_rednet26_involution_fpn.yaml",
    "Shapes/upernet_rednet26.yaml",
]


def _batch(cfg: CfgNode, size: int = 64) -> List[Dict]:
    """Two random images: one with two objects (or a labelled map), one with none."""
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, size, size), generator=g).float() for _ in range(2)]
    if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
        seg = torch.zeros(size, size, dtype=torch.long)
        seg[8:30, 10:40] = 1
        seg[35:60, 5:25] = 3
        empty = torch.zeros(size, size, dtype=torch.long)  # background only
        return [{"image": images[0], "sem_seg": seg}, {"image": images[1], "sem_seg": empty}]
    full = Instances((size, size))
    full.gt_boxes = Boxes(torch.tensor([[8.0, 10.0, 30.0, 40.0], [35.0, 5.0, 60.0, 25.0]]))
    full.gt_classes = torch.tensor([0, 2])
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    masks[0, 10:40, 8:30] = True
    masks[1, 5:25, 35:60] = True
    full.gt_masks = BitMasks(masks)
    empty = Instances((size, size))
    empty.gt_boxes = Boxes(torch.zeros(0, 4))
    empty.gt_classes = torch.zeros(0, dtype=torch.long)
    empty.gt_masks = BitMasks(torch.zeros(0, size, size, dtype=torch.bool))
    return [{"image": images[0], "instances": full}, {"image": images[1], "instances": empty}]


@pytest.mark.parametrize("name", STEP_CONFIGS)
def test_meta_architecture_forward_backward(name: str):
    torch.manual_seed(0)
    cfg = load_cfg(name)
    model = build_model(cfg).train()
    with EventStorage(0):
        losses = model(_batch(cfg))
    total = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    if cfg.MODEL.MASK_ON:
        assert "loss_mask" in losses
    if "UPerNet" in cfg.MODEL.SEM_SEG_HEAD.NAME:
        assert len(losses) == 2  # decode + auxiliary FCN
    total.backward()
    stem_grads = [p.grad for n, p in model.named_parameters() if ".stem." in f".{n}"]
    assert stem_grads and all(g is not None and torch.isfinite(g).all() for g in stem_grads)
    assert any(g.abs().sum() > 0 for g in stem_grads)
    model.eval()
    with torch.no_grad():
        out = model([{"image": _batch(cfg)[1]["image"], "height": 80, "width": 96}])[0]
    if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
        assert out["sem_seg"].shape == (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 80, 96)
    else:
        assert out["instances"].image_size == (80, 96)


# --- solver -------------------------------------------------------------------------------------


def _solver_cfg(**solver) -> CfgNode:
    cfg = get_cfg()
    add_involution_config(cfg)
    for key, value in solver.items():
        setattr(cfg.SOLVER, key, value)
    return cfg


def _lrs(cfg: CfgNode, steps: int) -> List[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    sched = build_lr_scheduler(cfg, opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_poly_lr_schedule_values():
    cfg = _solver_cfg(LR_SCHEDULER_NAME="WarmupPolyLR", BASE_LR=0.01, MAX_ITER=100, WARMUP_ITERS=0)
    lrs = _lrs(cfg, 100)
    for it in (0, 10, 50, 99):
        assert lrs[it] == pytest.approx(0.01 * (1 - it / 100) ** 0.9, rel=1e-6)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_poly_lr_schedule_warmup_and_constant_ending():
    cfg = _solver_cfg(
        LR_SCHEDULER_NAME="WarmupPolyLR",
        BASE_LR=0.02,
        MAX_ITER=100,
        WARMUP_ITERS=10,
        WARMUP_FACTOR=0.001,
        POLY_LR_POWER=1.0,
        POLY_LR_CONSTANT_ENDING=0.2,
    )
    lrs = _lrs(cfg, 100)
    assert lrs[0] == pytest.approx(0.02 * 0.001)
    assert lrs[0] < lrs[5] < lrs[10]
    assert lrs[10] == pytest.approx(0.02 * 0.9)
    assert lrs[50] == pytest.approx(0.02 * 0.5)
    assert lrs[95] == pytest.approx(0.02 * 0.2)  # 1 - 0.95 = 0.05 < 0.2: held constant


def test_multistep_schedule_still_detectron2s():
    cfg = _solver_cfg(BASE_LR=0.02, MAX_ITER=100, STEPS=(60, 80), WARMUP_ITERS=0)
    lrs = _lrs(cfg, 100)
    assert lrs[59] == pytest.approx(0.02) and lrs[60] == pytest.approx(0.002)
    assert lrs[80] == pytest.approx(0.0002)


@pytest.mark.parametrize("power,ending", [(0, 0.0), (-1, 0.0), (float("nan"), 0.0), (0.9, 1.0)])
def test_poly_scheduler_rejects_bad_arguments(power, ending):
    with pytest.raises(ValueError, match="power|constant_ending"):
        PolyParamScheduler(power, ending)


def test_poly_scheduler_values():
    sched = PolyParamScheduler(2.0)
    assert sched(0.0) == 1.0 and sched(0.5) == 0.25 and math.isclose(sched(0.9), 0.01)


def _model_with_grads() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, float(i + 1))
    return model


def test_full_model_clipping_clips_the_global_norm():
    cfg = _solver_cfg(BASE_LR=1.0, MOMENTUM=0.0, WEIGHT_DECAY=0.0, WEIGHT_DECAY_NORM=0.0)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    model = _model_with_grads()
    grads = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(cfg, model)
    opt.step()
    steps = [b - p.detach() for b, p in zip(before, model.parameters())]
    total = torch.sqrt(sum((s**2).sum() for s in steps))
    assert total == pytest.approx(0.5, rel=1e-4)
    # One scale for all parameters: the direction of the full gradient is kept.
    scale = steps[0].flatten()[0] / grads[0].flatten()[0]
    for s, g in zip(steps, grads):
        torch.testing.assert_close(s, g * scale)
    assert set(opt.state_dict()) == {"state", "param_groups"}


def test_full_model_clipping_differs_from_detectron2_per_parameter_norm():
    model = _model_with_grads()
    cfg = _solver_cfg(BASE_LR=1.0, MOMENTUM=0.0, WEIGHT_DECAY=0.0, WEIGHT_DECAY_NORM=0.0)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    before = [p.detach().clone() for p in model.parameters()]
    build_optimizer(cfg, model).step()
    norms = [torch.linalg.norm(b - p.detach()) for b, p in zip(before, model.parameters())]
    assert all(n == pytest.approx(0.5, rel=1e-4) for n in norms)  # each parameter separately


def _conv_bn() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    for i, p in enumerate(model.parameters()):
        p.grad = torch.linspace(-3.0, 2.0 + i, p.numel()).view_as(p)
    return model


def test_adamw_optimizer_takes_detectron2s_parameter_groups():
    cfg = _solver_cfg(OPTIMIZER="ADAMW", BASE_LR=1.0, WEIGHT_DECAY=0.05, WEIGHT_DECAY_NORM=0.0)
    model = _conv_bn()
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(model[0].weight)] == 0.05 and decay[id(model[1].weight)] == 0.0
    assert all(g["lr"] == 1.0 for g in opt.param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for b, g, p in zip(before, grads, model.parameters()):
        # Adam's first step moves every weight by lr (times its sign), whatever the gradient's
        # size; SGD would move it by lr * gradient. Decoupled decay adds lr * wd * weight.
        expected = b * (1.0 - decay[id(p)]) - torch.sign(g)
        torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=0)


def test_adamw_with_full_model_clipping_clips_the_global_norm():
    cfg = _solver_cfg(OPTIMIZER="ADAMW", BASE_LR=0.1, WEIGHT_DECAY=0.0, WEIGHT_DECAY_NORM=0.0)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    model = _conv_bn()
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    opt.step()
    total = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
    assert total == pytest.approx(0.5, rel=1e-4)


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match=r"SOLVER.OPTIMIZER must be one of \('SGD', 'ADAMW'\)"):
        build_optimizer(_solver_cfg(OPTIMIZER="adam"), _conv_bn())


def test_clip_full_model_gradients_rejects_bad_arguments():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="max_norm"):
        clip_full_model_gradients(opt, 0.0)
    with pytest.raises(TypeError, match="optimizer"):
        clip_full_model_gradients("sgd", 1.0)


# --- evaluators and augmentation ------------------------------------------------------------


def test_build_evaluator_by_dataset(tmp_path):
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    assert isinstance(build_evaluator(cfg, "shapes_val"), COCOEvaluator)
    assert isinstance(build_evaluator(cfg, "shapes_sem_seg_val"), SemSegEvaluator)
    with pytest.raises(NotImplementedError, match="evaluator_type"):
        build_evaluator(cfg, "d2inv_test_dataset_without_evaluator")
    with pytest.raises(TypeError, match="dataset_name"):
        build_evaluator(cfg, ["shapes_val"])


def test_sem_seg_train_augmentation_crops_and_keeps_labels_aligned():
    cfg = load_cfg("Shapes/semantic_fpn_rednet26_fpn.yaml")
    augs = build_sem_seg_train_aug(cfg)
    assert [type(a) for a in augs] == [
        T.ResizeShortestEdge,
        T.RandomCrop_CategoryAreaConstraint,
        T.RandomFlip,
    ]
    rng = np.random.RandomState(0)
    image = rng.randint(0, 255, (256, 256, 3)).astype(np.uint8)
    labels = np.zeros((256, 256), dtype=np.uint8)
    labels[64:192, 64:192] = 2
    image[..., 0] = labels * 100  # the red channel encodes the label
    crop_h, crop_w = cfg.INPUT.CROP.SIZE
    for seed in range(5):
        np.random.seed(seed)
        inp = T.AugInput(image.copy(), sem_seg=labels.copy())
        T.AugmentationList(augs)(inp)
        assert inp.image.shape[:2] == (crop_h, crop_w) == inp.sem_seg.shape
        # Nearest-neighbour labels follow the image: where the label is 2 the red channel is 200.
        inside = inp.sem_seg == 2
        assert np.all(np.abs(inp.image[..., 0][inside].astype(int) - 200) <= 60)


@pytest.mark.parametrize(
    "config",
    [
        "Shapes/mask_rcnn_rednet26_involution_fpn_head.yaml",
        "Shapes/retinanet_rednet26_involution_fpn.yaml",
        "Shapes/semantic_fpn_rednet26_involution_fpn.yaml",
        "Shapes/upernet_rednet26.yaml",
    ],
)
def test_generator_init_reaches_every_involution(config):
    """MODEL.INVOLUTION.GENERATOR_INIT reaches the backbone's, the neck's and the heads'
    involutions: the official fill leaves every kernel generator's bias at 0, "static" none."""
    for mode in ("official", "static"):
        cfg = load_cfg(config, "MODEL.INVOLUTION.GENERATOR_INIT", mode, "MODEL.WEIGHTS", "")
        involutions = [m for m in build_model(cfg).modules() if isinstance(m, Involution)]
        zero_bias = [bool((m.conv2.conv.bias == 0).all()) for m in involutions]
        assert len(involutions) >= 9, config
        assert all(zero_bias) if mode == "official" else not any(zero_bias), mode
    with pytest.raises(ValueError, match="generator_init must be one of"):
        build_model(load_cfg(config, "MODEL.INVOLUTION.GENERATOR_INIT", "zeros"))
