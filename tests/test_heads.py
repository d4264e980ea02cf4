"""InvolutionRPNHead, InvolutionMaskHead and UPerNetHead: structure, losses, end-to-end models."""

import d2_involution  # noqa: F401  (first: detectron2 compat + registrations)

# isort: split
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.semantic_seg import build_sem_seg_head
from detectron2.modeling.proposal_generator.rpn import StandardRPNHead, build_rpn_head
from detectron2.modeling.roi_heads.mask_head import (
    MaskRCNNConvUpsampleHead,
    build_mask_head,
    mask_rcnn_loss,
)
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from d2_involution import add_involution_config
from d2_involution.layers import Involution
from d2_involution.modeling import InvolutionMaskHead, InvolutionRPNHead, UPerNetHead

STAGES = ["res2", "res3", "res4", "res5"]


def base_cfg():
    cfg = get_cfg()
    add_involution_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.REDNET.DEPTH = 26
    cfg.MODEL.REDNET.NORM = "BN"
    cfg.MODEL.REDNET.OUT_FEATURES = list(STAGES)
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.PIXEL_STD = [57.4, 57.1, 57.4]
    return cfg


def rcnn_cfg():
    cfg = base_cfg()
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.BACKBONE.NAME = "build_rednet_involution_fpn_backbone"
    cfg.MODEL.FPN.IN_FEATURES = list(STAGES)
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.RPN.HEAD_NAME = "InvolutionRPNHead"
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 32
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 16
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.ROI_MASK_HEAD.NAME = "InvolutionMaskHead"
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 4
    cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 14
    cfg.TEST.DETECTIONS_PER_IMAGE = 5
    return cfg


def instances(h: int, w: int, boxes) -> Instances:
    inst = Instances((h, w))
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.arange(len(boxes)) % 3
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        m[y0:y1, x0:x1] = True
    inst.gt_masks = BitMasks(masks)
    return inst


def test_rpn_head_replaces_only_the_conv():
    cfg = rcnn_cfg()
    shapes = [ShapeSpec(channels=256, stride=s) for s in (4, 8, 16, 32, 64)]
    head = build_rpn_head(cfg, shapes)
    assert isinstance(head, InvolutionRPNHead) and isinstance(head, StandardRPNHead)
    assert isinstance(head.conv.involution, Involution) and isinstance(head.conv.relu, nn.ReLU)
    assert head.conv.involution.kernel_size == 7 and head.conv.involution.stride == 1
    cfg.MODEL.RPN.HEAD_NAME = "StandardRPNHead"
    standard = build_rpn_head(cfg, shapes)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(head) - n(head.conv) == n(standard) - n(standard.conv)
    assert n(head.conv) == 256 * 64 + 2 * 64 + 64 * 49 * 16 + 49 * 16
    feats = [torch.randn(2, 256, s, s + 1) for s in (9, 5)]
    logits, deltas = head(feats)
    ref_logits, ref_deltas = standard(feats)
    assert [t.shape for t in logits] == [t.shape for t in ref_logits]
    assert [t.shape for t in deltas] == [t.shape for t in ref_deltas]


def test_rpn_head_rejects_channel_changing_conv_dims():
    cfg = rcnn_cfg()
    cfg.MODEL.RPN.CONV_DIMS = [128]
    with pytest.raises(ValueError, match="CONV_DIMS"):
        build_rpn_head(cfg, [ShapeSpec(channels=256, stride=s) for s in (4, 8, 16, 32, 64)])


def test_mask_head_structure_and_loss_equal_detectron2():
    cfg = rcnn_cfg()
    head = build_mask_head(cfg, ShapeSpec(channels=256, width=14, height=14))
    assert isinstance(head, InvolutionMaskHead) and isinstance(head, MaskRCNNConvUpsampleHead)
    convs = [getattr(head, f"mask_fcn{k}") for k in range(1, 5)]
    assert all(isinstance(c.involution, Involution) for c in convs)
    assert head.conv_norm_relus == convs
    cfg.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    standard = build_mask_head(cfg, ShapeSpec(channels=256, width=14, height=14))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(head) - sum(map(n, convs)) == n(standard) - sum(map(n, standard.conv_norm_relus))
    assert [name for name, _ in head.named_children()] == [
        "mask_fcn1",
        "mask_fcn2",
        "mask_fcn3",
        "mask_fcn4",
        "deconv",
        "deconv_relu",
        "predictor",
    ]
    x = torch.randn(3, 256, 14, 14)
    assert head.layers(x).shape == (3, 3, 28, 28)

    props = instances(40, 40, [[2, 2, 20, 30], [10, 5, 35, 25], [0, 0, 39, 39]])
    props.proposal_boxes = props.gt_boxes
    head.train()
    torch.manual_seed(0)
    with EventStorage():
        loss = head(x, [props])["loss_mask"]
        expected = mask_rcnn_loss(head.layers(x), [props])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert head.mask_fcn1.involution.conv2.conv.weight.grad.abs().sum() > 0


def test_mask_head_rejects_channel_changing_conv_dim():
    cfg = rcnn_cfg()
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 128
    with pytest.raises(ValueError, match="CONV_DIM"):
        build_mask_head(cfg, ShapeSpec(channels=256, width=14, height=14))


def test_mask_rcnn_with_involution_heads_trains_and_predicts():
    torch.manual_seed(0)
    model = build_model(rcnn_cfg())
    assert isinstance(model.proposal_generator.rpn_head, InvolutionRPNHead)
    assert isinstance(model.roi_heads.mask_head, InvolutionMaskHead)
    batch = [
        {"image": torch.rand(3, 45, 53) * 255, "instances": instances(45, 53, [[5, 6, 40, 38]])},
        {"image": torch.rand(3, 32, 32) * 255, "instances": instances(32, 32, [])},
    ]
    model.train()
    with EventStorage():
        losses = model(batch)
    expected = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    rpn_inv = model.proposal_generator.rpn_head.conv.involution
    assert rpn_inv.conv2.conv.weight.grad.abs().sum() > 0
    assert model.backbone.fpn_output2.conv2.conv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": torch.rand(3, 45, 53) * 255}])
    inst = out["instances"]
    assert inst.image_size == (45, 53) and len(inst) <= 5
    assert inst.pred_masks.shape[1:] == (45, 53)


def seg_features(batch: int = 2, h: int = 12, w: int = 14):
    shapes = {
        "res2": ShapeSpec(channels=16, stride=4),
        "res3": ShapeSpec(channels=24, stride=8),
        "res4": ShapeSpec(channels=32, stride=16),
        "res5": ShapeSpec(channels=40, stride=32),
    }
    feats = {
        k: torch.randn(batch, s.channels, -(-h * 4 // s.stride), -(-w * 4 // s.stride))
        for k, s in shapes.items()
    }
    return shapes, feats


def upernet(shapes, **kwargs) -> UPerNetHead:
    args = dict(num_classes=5, in_features=STAGES, channels=32, aux_channels=16, norm="BN")
    args.update(kwargs)
    return UPerNetHead(shapes, **args)


def test_upernet_structure():
    shapes, _ = seg_features()
    head = upernet(shapes)
    assert head.psp.scales == (1, 2, 3, 6)
    pools = [stage[0] for stage in head.psp.stages]
    assert [p.output_size for p in pools] == [1, 2, 3, 6]
    assert head.psp.bottleneck.conv.in_channels == 40 + 4 * 32
    assert [c.conv.in_channels for c in head.lateral_convs] == [16, 24, 32]
    assert head.fpn_bottleneck.conv.in_channels == 4 * 32
    assert head.aux_convs[0].conv.in_channels == 32  # auxiliary FCN on res4
    assert head.predictor.out_channels == head.aux_predictor.out_channels == 5


def test_upernet_train_losses_and_inference_logits():
    torch.manual_seed(0)
    shapes, feats = seg_features()
    targets = torch.randint(0, 5, (2, 48, 56))
    targets[1, :10] = 255
    head = upernet(shapes, dropout=0.0, ignore_value=255, aux_loss_weight=0.4).train()
    none, losses = head(feats, targets)
    assert none is None and set(losses) == {"loss_sem_seg", "loss_sem_seg_aux"}
    (losses["loss_sem_seg"] + losses["loss_sem_seg_aux"]).backward()
    assert head.aux_predictor.weight.grad.abs().sum() > 0
    assert head.psp.stages[3][1].conv.weight.grad.abs().sum() > 0

    heavier = upernet(shapes, dropout=0.0, ignore_value=255, aux_loss_weight=0.8)
    heavier.load_state_dict(head.state_dict())
    _, losses2 = heavier.train()(feats, targets)
    torch.testing.assert_close(losses2["loss_sem_seg_aux"], 2 * losses["loss_sem_seg_aux"])
    torch.testing.assert_close(losses2["loss_sem_seg"], losses["loss_sem_seg"])

    head.eval()
    with torch.no_grad():
        logits, extra = head(feats)
    assert extra == {} and logits.shape == (2, 5, 48, 56)

    no_aux = upernet(shapes, aux_loss_weight=0.0, ignore_value=255).train()
    assert not hasattr(no_aux, "aux_predictor")
    assert set(no_aux(feats, targets)[1]) == {"loss_sem_seg"}


def test_upernet_from_config_in_semantic_segmentor():
    cfg = base_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    cfg.MODEL.BACKBONE.NAME = "build_rednet_backbone"
    cfg.MODEL.SEM_SEG_HEAD.NAME = "UPerNetHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = list(STAGES)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255
    cfg.MODEL.SEM_SEG_HEAD.UPERNET.CHANNELS = 64
    cfg.MODEL.SEM_SEG_HEAD.UPERNET.AUX_CHANNELS = 32
    model = build_model(cfg)
    head = model.sem_seg_head
    assert isinstance(head, UPerNetHead) and head.aux_loss_weight == pytest.approx(0.4)
    assert head.ignore_value == 255 and head.predictor.in_channels == 64
    batch = [
        {"image": torch.rand(3, 45, 53) * 255, "sem_seg": torch.randint(0, 4, (45, 53))},
        {"image": torch.rand(3, 32, 32) * 255, "sem_seg": torch.full((32, 32), 255)},
    ]
    model.train()
    losses = model(batch)
    assert set(losses) == {"loss_sem_seg", "loss_sem_seg_aux"}
    sum(losses.values()).backward()
    assert model.backbone.stem.conv1.conv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": torch.rand(3, 45, 53) * 255, "height": 30, "width": 37}])
    assert out["sem_seg"].shape == (4, 30, 37)


def test_upernet_bad_config_raises():
    shapes, _ = seg_features()
    with pytest.raises(ValueError, match="in_features"):
        upernet(shapes, in_features=["res2", "res6"])
    with pytest.raises(ValueError, match="aux_in_feature"):
        upernet(shapes, aux_in_feature="p4")
    with pytest.raises(ValueError, match="pool_scales"):
        upernet(shapes, pool_scales=[0, 2])
    cfg = base_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NAME = "UPerNetHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["p2"]
    with pytest.raises(ValueError, match="in_features"):
        build_sem_seg_head(cfg, shapes)
