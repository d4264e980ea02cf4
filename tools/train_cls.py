#!/usr/bin/env python
"""Train, evaluate or export RedNet ImageNet-style classifiers (d2_involution.classification).

    python tools/train_cls.py --config-file configs/Shapes-Classification/rednet26.yaml
    python tools/train_cls.py --config-file configs/ImageNet-Classification/rednet50.yaml \\
        --num-gpus 8 SOLVER.CLS.ACCUMULATION_STEPS 8
    python tools/train_cls.py --config-file CFG --resume
    python tools/train_cls.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_cls.py --config-file CFG --export-backbone rednet50_d2.pth \\
        MODEL.WEIGHTS output/model_final.pth
"""

import d2_involution  # isort: skip  # noqa: F401  (first: detectron2 compat + registrations)
from detectron2.engine import launch

from d2_involution.classification import argument_parser, main

if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
