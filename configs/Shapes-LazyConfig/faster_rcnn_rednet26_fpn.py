# Faster R-CNN, RedNet-26, conv FPN on the built-in shapes data: configs/Shapes/
# faster_rcnn_rednet26_fpn.yaml (Base-Shapes-RCNN.yaml) as a LazyConfig, sized for 2 CPU cores.
from detectron2.config import LazyCall as L

from d2_involution.solver import clip_full_model_gradients

from ..common.data.coco import dataloader
from ..common.models.faster_rcnn_rednet_fpn import model
from ..common.train import lr_multiplier, optimizer, train

# From scratch, every stage trains with batch statistics, the kernel generators start as
# group-shared convs; a narrower FPN and heads.
model.backbone.bottom_up.update(depth=26, norm="BN", freeze_at=0, generator_init="static")
model.backbone.out_channels = 128
model.proposal_generator.head.in_channels = 128
# One anchor size per level; the shapes are 25-65 px.
model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
model.proposal_generator.update(
    batch_size_per_image=128, pre_nms_topk=(1000, 500), post_nms_topk=(300, 100)
)
model.roi_heads.update(num_classes=5, batch_size_per_image=64)
# A fixed 2x2 sampling grid per bin: torchvision's CPU RoIAlign backward dominates otherwise.
model.roi_heads.box_pooler.sampling_ratio = 2
model.roi_heads.box_head.input_shape.channels = 128
model.roi_heads.box_head.fc_dims = [256, 256]
model.roi_heads.box_predictor.input_shape.channels = 256
model.roi_heads.box_predictor.test_topk_per_image = 20

dataloader.train.dataset.names = "shapes_train"
dataloader.train.mapper.augmentations[0].update(short_edge_length=(128,), max_size=128)
dataloader.train.update(total_batch_size=4, num_workers=0)
dataloader.test.dataset.names = "shapes_val"
dataloader.test.mapper.augmentations[0].update(short_edge_length=128, max_size=128)
dataloader.test.num_workers = 0

# LR 0.02 diverged in one of two runs from scratch at 4 images: 0.01 and whole-model clipping.
optimizer.update(lr=0.01)
optimizer.params.weight_decay_norm = 0.0
optimizer = L(clip_full_model_gradients)(optimizer=optimizer, max_norm=5.0)
lr_multiplier.scheduler.update(values=[1.0, 0.1], milestones=[650], num_updates=800)
lr_multiplier.warmup_length = 30 / 800
train.update(init_checkpoint="", max_iter=800, eval_period=200, device="cpu", seed=42)
train.output_dir = "output/shapes-lazyconfig/faster_rcnn_rednet26_fpn"
train.checkpointer.period = 100000
