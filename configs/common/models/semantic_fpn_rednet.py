"""Semantic FPN, RedNet-50 + conv FPN: the model of configs/Base-SemanticFPN-RedNet.yaml.

RedNet-50 (7x7 involution stem, every stage trained with SyncBN), Detectron2's FPN (P2-P6) and its
``SemSegFPNHead`` on P2-P5 (128 channels, fused at stride 4), 19 Cityscapes classes, RGB input with
the ImageNet mean/std. tests/test_lazyconfig.py checks that this and the YAML build the same model.
"""

from collections import OrderedDict

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling import FPN, SemanticSegmentor
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead

from d2_involution.modeling import build_rednet

model = L(SemanticSegmentor)(
    backbone=L(FPN)(
        bottom_up=L(build_rednet)(
            depth=50,
            stem_involution_kernel=7,
            norm="SyncBN",
            out_features=["res2", "res3", "res4", "res5"],
            freeze_at=0,
        ),
        in_features="${.bottom_up.out_features}",
        out_channels=256,
        top_block=L(LastLevelMaxPool)(),
    ),
    sem_seg_head=L(SemSegFPNHead)(
        # A call, so that instantiate() builds the ShapeSpecs inside (it leaves plain dicts as
        # they are); OmegaConf does not take L(dict).
        input_shape=L(OrderedDict)(
            p2=L(ShapeSpec)(channels=256, stride=4),
            p3=L(ShapeSpec)(channels=256, stride=8),
            p4=L(ShapeSpec)(channels=256, stride=16),
            p5=L(ShapeSpec)(channels=256, stride=32),
        ),
        num_classes=19,
        conv_dims=128,
        common_stride=4,
        loss_weight=1.0,
        norm="SyncBN",
        ignore_value=255,
    ),
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
)
