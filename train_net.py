#!/usr/bin/env python
"""Train and evaluate RedNet / involution models with Detectron2.

Detection (Faster/Mask R-CNN, RetinaNet) and semantic segmentation (semantic FPN, UPerNet) share
this script; the evaluator follows the dataset's ``evaluator_type``, semantic segmentation gets its
crop/flip augmentation, and ``SOLVER.LR_SCHEDULER_NAME: WarmupPolyLR`` selects the poly schedule.

    python train_net.py --config-file configs/Shapes/faster_rcnn_R26_FPN_involution_neck.yaml
    python train_net.py --config-file CFG --num-gpus 8
    python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
"""

import d2_involution  # isort: skip  # noqa: F401  (first: detectron2 compat + registrations)
import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results

from d2_involution import add_involution_config
from d2_involution.engine import build_evaluator, build_sem_seg_train_aug
from d2_involution.solver import build_lr_scheduler, build_optimizer


class Trainer(DefaultTrainer):
    """DefaultTrainer plus evaluators by dataset, sem-seg augmentation, poly LR, global clipping."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
            mapper = DatasetMapper(cfg, is_train=True, augmentations=build_sem_seg_train_aug(cfg))
            return build_detection_train_loader(cfg, mapper=mapper)
        return super().build_train_loader(cfg)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)


def setup(args):
    """Config from the file and command line, then Detectron2's logging/output-dir set-up."""
    cfg = get_cfg()
    add_involution_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # The final evaluation's results (DefaultTrainer keeps them; None without a test set).
    return getattr(trainer, "_last_eval_results", None)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
