"""RetinaNet, RedNet-50 + conv FPN on C3-C5 with P6/P7 from C5: configs/Base-RetinaNet-RedNet.yaml.

RedNet-50 (7x7 involution stem, FrozenStatsBN, stem and res2 frozen), Detectron2's FPN with the
official neck's P6/P7 (no ReLU before P7), its RetinaNet head (4 convs) and focal loss, RGB input
with the ImageNet mean/std. tests/test_lazyconfig.py checks that this and the YAML build the same
model.
"""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling import FPN, RetinaNet
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

from d2_involution.modeling import LastLevelP6P7WithoutReLU, build_rednet

model = L(RetinaNet)(
    backbone=L(FPN)(
        bottom_up=L(build_rednet)(
            depth=50,
            stem_involution_kernel=7,
            norm="FrozenStatsBN",
            out_features=["res3", "res4", "res5"],
            freeze_at=2,
        ),
        in_features="${.bottom_up.out_features}",
        out_channels=256,
        top_block=L(LastLevelP6P7WithoutReLU)(in_channels=2048, out_channels="${..out_channels}"),
    ),
    head=L(RetinaNetHead)(
        input_shape=[L(ShapeSpec)(channels=256)] * 5,
        num_classes="${..num_classes}",
        num_anchors=9,
        conv_dims=[256, 256, 256, 256],
        prior_prob=0.01,
    ),
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    # mmdet octave_base_scale=4, scales_per_octave=3: x * 2 ** (k / 3), rounded as in the YAML.
    anchor_generator=L(DefaultAnchorGenerator)(
        sizes=[[round(x * 2 ** (k / 3), 3) for k in range(3)] for x in (32, 64, 128, 256, 512)],
        aspect_ratios=[0.5, 1.0, 2.0],
        strides=[8, 16, 32, 64, 128],
        offset=0.0,
    ),
    box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
    anchor_matcher=L(Matcher)(
        thresholds=[0.4, 0.5], labels=[0, -1, 1], allow_low_quality_matches=True
    ),
    num_classes=80,
    focal_loss_alpha=0.25,
    focal_loss_gamma=2.0,
    smooth_l1_beta=0.0,
    test_score_thresh=0.05,
    test_topk_candidates=1000,
    test_nms_thresh=0.5,
    max_detections_per_image=100,
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    input_format="RGB",
)
