# Mask R-CNN, RedNet-50, convolution FPN: mask_rcnn_rednet50_fpn_1x.yaml as a LazyConfig.
from ..common.data.coco import dataloader
from ..common.models.mask_rcnn_rednet_fpn import model  # noqa: F401
from ..common.train import lr_multiplier, optimizer, train  # noqa: F401

dataloader.train.mapper.use_instance_mask = True
