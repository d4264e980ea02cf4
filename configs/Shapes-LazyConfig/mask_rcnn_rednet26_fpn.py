# Mask R-CNN, RedNet-26, conv FPN and heads on the built-in shapes data: configs/Shapes/
# mask_rcnn_rednet26_fpn.yaml as a LazyConfig (the Faster R-CNN next to it plus the mask head,
# 600 iterations).
from ..common.models.mask_rcnn_rednet_fpn import model as _mask_rcnn
from .faster_rcnn_rednet26_fpn import dataloader, lr_multiplier, model, optimizer, train  # noqa

for _name in ("mask_in_features", "mask_pooler", "mask_head"):
    model.roi_heads[_name] = _mask_rcnn.roi_heads[_name]
model.roi_heads.mask_pooler.sampling_ratio = 2
model.roi_heads.mask_head.input_shape.channels = 128
model.roi_heads.mask_head.conv_dims = [128] * 5
dataloader.train.mapper.update(use_instance_mask=True, instance_mask_format="bitmask")
lr_multiplier.scheduler.update(milestones=[490], num_updates=600)
lr_multiplier.warmup_length = 30 / 600
train.max_iter = 600
train.output_dir = "output/shapes-lazyconfig/mask_rcnn_rednet26_fpn"
