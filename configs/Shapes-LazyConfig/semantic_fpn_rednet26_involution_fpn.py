# Semantic FPN, RedNet-26, involution FPN neck on the built-in shapes data: configs/Shapes/
# semantic_fpn_rednet26_involution_fpn.yaml as a LazyConfig.
from detectron2.config import LazyCall as L

from d2_involution.modeling import use_involution_outputs

from .semantic_fpn_rednet26_fpn import dataloader, lr_multiplier, model, optimizer, train  # noqa

model.backbone = L(use_involution_outputs)(fpn=model.backbone, norm="BN", generator_init="static")
train.output_dir = "output/shapes-lazyconfig/semantic_fpn_rednet26_involution_fpn"
