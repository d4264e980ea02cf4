# RetinaNet, RedNet-26, conv FPN on the built-in shapes data: configs/Shapes/retinanet_rednet26_fpn
# .yaml (Base-Shapes-RetinaNet.yaml) as a LazyConfig: the data, schedule and run settings of
# faster_rcnn_rednet26_fpn.py next to it, RetinaNet's LR and clipping.
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from ..common.models.retinanet_rednet_fpn import model
from .faster_rcnn_rednet26_fpn import dataloader, lr_multiplier, optimizer, train  # noqa: F401

# From scratch, every stage trains with batch statistics; a narrower FPN and head (2 convs).
model.backbone.bottom_up.update(depth=26, norm="BN", freeze_at=0, generator_init="static")
model.backbone.out_channels = 128
model.head.update(input_shape=[L(ShapeSpec)(channels=128)] * 5, conv_dims=[128, 128], norm="BN")
model.anchor_generator.sizes = [
    [round(x * 2 ** (k / 3), 3) for k in range(3)] for x in (16, 32, 64, 128, 256)
]
model.update(num_classes=5, test_topk_candidates=200, max_detections_per_image=20)

# 6x the linear-scaled 0.0025 (see the YAML); whole-model clipping at the official 40.
optimizer.optimizer.lr = 0.015
optimizer.max_norm = 40.0
# 1400 iterations, the LR step at 1150, val every 350 (see the YAML).
lr_multiplier.scheduler.update(milestones=[1150], num_updates=1400)
lr_multiplier.warmup_length = 30 / 1400
train.update(max_iter=1400, eval_period=350)
train.output_dir = "output/shapes-lazyconfig/retinanet_rednet26_fpn"
