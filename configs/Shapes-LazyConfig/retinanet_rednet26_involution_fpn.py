# RetinaNet, RedNet-26, involution FPN neck on the built-in shapes data: configs/Shapes/
# retinanet_rednet26_involution_fpn.yaml as a LazyConfig (clipping at 5, 1800 iterations, see the
# YAML).
from detectron2.config import LazyCall as L

from d2_involution.modeling import use_involution_outputs

from .retinanet_rednet26_fpn import dataloader, lr_multiplier, model, optimizer, train  # noqa

model.backbone = L(use_involution_outputs)(fpn=model.backbone, norm="BN", generator_init="static")
optimizer.max_norm = 5.0
lr_multiplier.scheduler.update(milestones=[1500], num_updates=1800)
lr_multiplier.warmup_length = 30 / 1800
train.update(max_iter=1800, eval_period=450)
train.output_dir = "output/shapes-lazyconfig/retinanet_rednet26_involution_fpn"
