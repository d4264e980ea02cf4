"""Solver and run settings of the RedNet detectors' 1x schedule (Base-RCNN-FPN-RedNet.yaml).

SGD at LR 0.02 for 16 images, weight decay 1e-4 on every parameter (norms too, as mmdet), 90k
iterations with steps at 60k and 80k and a 2k-iteration linear warm-up; ``train`` holds what
tools/lazyconfig_train_net.py reads.
"""

import torch
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler, get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler

optimizer = L(torch.optim.SGD)(
    params=L(get_default_optimizer_params)(weight_decay_norm=1e-4),
    lr=0.02,
    momentum=0.9,
    weight_decay=1e-4,
)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[60000, 80000], num_updates=90000
    ),
    warmup_length=2000 / 90000,
    warmup_factor=0.001,
)
train = dict(
    output_dir="./output",
    init_checkpoint="pretrained/rednet50_imagenet_d2.pth",
    max_iter=90000,
    amp=dict(enabled=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=10000, max_to_keep=100),
    eval_period=0,
    log_period=20,
    device="cuda",
    seed=-1,
)
