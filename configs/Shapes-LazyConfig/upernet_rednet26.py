# UPerNet, RedNet-26 (128 channels, auxiliary FCN head on res4) on the built-in shapes data:
# configs/Shapes/upernet_rednet26.yaml as a LazyConfig, with the data and schedule of
# semantic_fpn_rednet26_fpn.py next to it, 1200 iterations.
from ..common.models.upernet_rednet import model
from .semantic_fpn_rednet26_fpn import dataloader, lr_multiplier, optimizer, train  # noqa: F401

model.backbone.update(depth=26, norm="BN", stem_involution_kernel=3, generator_init="static")
model.sem_seg_head.update(num_classes=6, channels=128, aux_channels=64, norm="BN")
lr_multiplier.warmup_length = 20 / 1200
train.update(max_iter=1200, eval_period=300)
train.output_dir = "output/shapes-lazyconfig/upernet_rednet26"
