"""Solver and run settings of the RedNet segmentation models (Base-SemanticFPN-RedNet.yaml): the
mmseg 80k schedule, SGD at LR 0.01 for 8 images, weight decay 5e-4 on every parameter, poly decay
with power 0.9 and no warm-up, a checkpoint and an evaluation every 8k iterations. ``train`` is
configs/common/train.py's with these values."""

from detectron2.config import LazyCall as L

from d2_involution.solver import PolyParamScheduler

from .train import optimizer, train

optimizer.update(lr=0.01, weight_decay=5e-4)
optimizer.params.weight_decay_norm = 5e-4
lr_multiplier = L(PolyParamScheduler)(power=0.9, constant_ending=0.0)
train.update(max_iter=80000, eval_period=8000)
train.checkpointer.period = 8000
