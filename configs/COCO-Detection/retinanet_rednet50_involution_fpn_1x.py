# RetinaNet, RedNet-50, involution FPN neck: retinanet_rednet50_involution_fpn_1x.yaml as a
# LazyConfig. The FPN's 3x3 output convs on C3-C5 become Involution(256, 7) blocks (BN in their
# kernel generator; P6/P7 stay convs), and the official global gradient-norm clipping at 40.
from detectron2.config import LazyCall as L

from d2_involution.modeling import use_involution_outputs
from d2_involution.solver import clip_full_model_gradients

from ..common.data.coco import dataloader  # noqa: F401
from ..common.models.retinanet_rednet_fpn import model
from ..common.train import lr_multiplier, optimizer, train  # noqa: F401

model.backbone = L(use_involution_outputs)(fpn=model.backbone, norm="BN")
optimizer.lr = 0.01
optimizer = L(clip_full_model_gradients)(optimizer=optimizer, max_norm=40.0)
