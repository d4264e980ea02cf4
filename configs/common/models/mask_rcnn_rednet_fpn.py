"""Mask R-CNN with a RedNet-50 + conv FPN backbone (Base-RCNN-FPN-RedNet.yaml with MASK_ON):
the Faster R-CNN of faster_rcnn_rednet_fpn.py plus Detectron2's 4-conv mask head on P2-P5."""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import MaskRCNNConvUpsampleHead

from .faster_rcnn_rednet_fpn import model

model.roi_heads.update(
    mask_in_features="${.box_in_features}",
    mask_pooler=L(ROIPooler)(
        output_size=14,
        scales="${..box_pooler.scales}",
        sampling_ratio=0,
        pooler_type="ROIAlignV2",
    ),
    mask_head=L(MaskRCNNConvUpsampleHead)(
        input_shape=L(ShapeSpec)(channels=256, height=14, width=14),
        num_classes="${..num_classes}",
        conv_dims=[256, 256, 256, 256, 256],
    ),
)
