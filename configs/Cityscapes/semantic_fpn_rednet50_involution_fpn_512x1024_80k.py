# Semantic FPN, RedNet-50, involution FPN neck: semantic_fpn_rednet50_involution_fpn_512x1024_80k
# .yaml as a LazyConfig. The FPN's 3x3 output convs become Involution(256, 7) blocks (BN in their
# kernel generator); its fields are now under model.backbone.fpn.
from detectron2.config import LazyCall as L

from d2_involution.modeling import use_involution_outputs

from ..common.data.cityscapes_sem_seg import dataloader  # noqa: F401
from ..common.models.semantic_fpn_rednet import model
from ..common.train_sem_seg import lr_multiplier, optimizer, train  # noqa: F401

model.backbone = L(use_involution_outputs)(fpn=model.backbone, norm="BN")
