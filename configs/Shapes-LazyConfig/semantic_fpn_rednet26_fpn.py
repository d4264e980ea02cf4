# Semantic FPN, RedNet-26, conv FPN on the built-in shapes data (background + 5 shapes): configs/
# Shapes/semantic_fpn_rednet26_fpn.yaml (Base-Shapes-SemanticFPN.yaml) as a LazyConfig, sized for
# 2 CPU cores.
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler

from d2_involution.solver import clip_full_model_gradients

from ..common.data.cityscapes_sem_seg import dataloader
from ..common.models.semantic_fpn_rednet import model
from ..common.train_sem_seg import lr_multiplier, optimizer, train

# From the shapes-pretrained RedNet-26 (its 3x3 stem involution) with batch statistics, the kernel
# generators trained from scratch starting as group-shared convs; a narrower FPN and head.
model.backbone.bottom_up.update(
    depth=26, norm="BN", stem_involution_kernel=3, generator_init="static"
)
model.backbone.out_channels = 128
for _level in ("p2", "p3", "p4", "p5"):
    model.sem_seg_head.input_shape[_level].channels = 128
model.sem_seg_head.update(num_classes=6, conv_dims=64, norm="BN")

# Random scale 1-1.25 of the 128 px images, then 128x128 crops; test at 128.
dataloader.train.dataset.names = "shapes_sem_seg_train"
dataloader.train.mapper.augmentations[0].update(short_edge_length=(128, 144, 160), max_size=160)
dataloader.train.mapper.augmentations[1].update(crop_size=(128, 128), single_category_max_area=0.9)
dataloader.train.update(total_batch_size=4, num_workers=0)
dataloader.test.dataset.names = "shapes_sem_seg_val"
dataloader.test.mapper.augmentations[0].update(short_edge_length=128, max_size=128)
dataloader.test.num_workers = 0

optimizer.update(lr=0.01, weight_decay=1e-4)
optimizer.params.weight_decay_norm = 0.0
optimizer = L(clip_full_model_gradients)(optimizer=optimizer, max_norm=5.0)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=lr_multiplier, warmup_factor=0.001, warmup_length=20 / 1000
)
train.update(
    init_checkpoint="shapes-pretrained://rednet26",
    max_iter=1000,
    eval_period=250,
    device="cpu",
    seed=42,
)
train.output_dir = "output/shapes-lazyconfig/semantic_fpn_rednet26_fpn"
train.checkpointer.period = 100000
