# Faster R-CNN, RedNet-50, convolution FPN: faster_rcnn_rednet50_fpn_1x.yaml as a LazyConfig.
from ..common.data.coco import dataloader  # noqa: F401
from ..common.models.faster_rcnn_rednet_fpn import model  # noqa: F401
from ..common.train import lr_multiplier, optimizer, train  # noqa: F401
