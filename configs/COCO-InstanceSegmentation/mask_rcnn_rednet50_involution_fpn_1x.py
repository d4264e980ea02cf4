# Mask R-CNN, RedNet-50, involution FPN neck: mask_rcnn_rednet50_involution_fpn_1x.yaml as a
# LazyConfig (the involution neck of faster_rcnn_rednet50_involution_fpn_1x.py).
from detectron2.config import LazyCall as L

from d2_involution.modeling import use_involution_outputs

from ..common.data.coco import dataloader
from ..common.models.mask_rcnn_rednet_fpn import model
from ..common.train import lr_multiplier, optimizer, train  # noqa: F401

model.backbone = L(use_involution_outputs)(fpn=model.backbone, norm="BN")
dataloader.train.mapper.use_instance_mask = True
