"""UPerNet, RedNet-50: the model of configs/Base-UPerNet-RedNet.yaml.

The RedNet-50 of semantic_fpn_rednet.py without an FPN, and ``UPerNetHead`` on C2-C5 (pyramid
pooling 1/2/3/6 on C5, 512 channels, auxiliary FCN head on C4 with loss weight 0.4).
tests/test_lazyconfig.py checks that this and the YAML build the same model.
"""

from collections import OrderedDict

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from d2_involution.modeling import UPerNetHead

from .semantic_fpn_rednet import model

model.backbone = model.backbone.bottom_up
model.sem_seg_head = L(UPerNetHead)(
    # C2-C5 of every RedNet depth.
    input_shape=L(OrderedDict)(
        res2=L(ShapeSpec)(channels=256, stride=4),
        res3=L(ShapeSpec)(channels=512, stride=8),
        res4=L(ShapeSpec)(channels=1024, stride=16),
        res5=L(ShapeSpec)(channels=2048, stride=32),
    ),
    num_classes=19,
    in_features=["res2", "res3", "res4", "res5"],
    channels=512,
    pool_scales=[1, 2, 3, 6],
    norm="SyncBN",
    dropout=0.1,
    loss_weight=1.0,
    ignore_value=255,
    aux_in_feature="res4",
    aux_channels=256,
    aux_num_convs=1,
    aux_loss_weight=0.4,
)
