# RetinaNet, RedNet-50, convolution FPN: retinanet_rednet50_fpn_1x.yaml as a LazyConfig.
from ..common.data.coco import dataloader  # noqa: F401
from ..common.models.retinanet_rednet_fpn import model  # noqa: F401
from ..common.train import lr_multiplier, optimizer, train  # noqa: F401

# RetinaNet's LR for 16 images (the R-CNNs': 0.02).
optimizer.lr = 0.01
