# Faster R-CNN, RedNet-50, involution FPN neck: faster_rcnn_rednet50_involution_fpn_1x.yaml as a
# LazyConfig. The FPN's 3x3 output convs become Involution(256, 7) blocks (BN in their kernel
# generator); its fields are now under model.backbone.fpn.
from detectron2.config import LazyCall as L

from d2_involution.modeling import use_involution_outputs

from ..common.data.coco import dataloader  # noqa: F401
from ..common.models.faster_rcnn_rednet_fpn import model
from ..common.train import lr_multiplier, optimizer, train  # noqa: F401

model.backbone = L(use_involution_outputs)(fpn=model.backbone, norm="BN")
