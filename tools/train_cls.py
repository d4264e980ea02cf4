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
import argparse
import os
from typing import Any, Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from d2_involution.checkpoint import backbone_state_dict, export_backbone
from d2_involution.classification import ClassificationTrainer, get_cls_cfg
from d2_involution.classification.data import resolve_classes_and_batch, resolve_dataset_root
from d2_involution.modeling import build_rednet


def argument_parser() -> argparse.ArgumentParser:
    """Detectron2's ``default_argument_parser`` plus ``--export-backbone``, ``--export-prefix``."""
    parser = default_argument_parser(
        epilog="Examples:\n"
        "  train:  tools/train_cls.py --config-file configs/Shapes-Classification/rednet26.yaml\n"
        "  eval:   tools/train_cls.py --config-file CFG --eval-only MODEL.WEIGHTS model_final.pth\n"
        "  export: tools/train_cls.py --config-file CFG --export-backbone rednet_d2.pth "
        "MODEL.WEIGHTS model_final.pth\n"
    )
    parser.add_argument(
        "--export-backbone",
        default="",
        metavar="OUT",
        help="write the backbone of MODEL.WEIGHTS to OUT (.pth/.pkl) for detection MODEL.WEIGHTS",
    )
    parser.add_argument(
        "--export-prefix",
        default="",
        help="prefix for exported names ('' = Detectron2 suffix matching; 'backbone.bottom_up.' "
        "= exact names of FPN detectors)",
    )
    return parser


def setup(args: argparse.Namespace) -> CfgNode:
    """Config from file and command line, resolved (classes, batch, LR, iterations) and frozen."""
    cfg = get_cls_cfg()
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2_involution")
    if getattr(args, "export_backbone", ""):
        cfg.freeze()
        return cfg
    resolve_classes_and_batch(cfg, comm.get_world_size(), training=not args.eval_only)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def export(cfg: CfgNode, output: str, prefix: str) -> Dict[str, torch.Tensor]:
    """Write the RedNet of the classifier in ``MODEL.WEIGHTS`` to ``output`` (main process)."""
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("--export-backbone needs the trained classifier in MODEL.WEIGHTS")
    state = backbone_state_dict(cfg.MODEL.WEIGHTS)
    expected = build_rednet(cfg, out_features=["res5"], freeze_at=0).state_dict()
    wrong = [k for k in expected if k not in state or tuple(state[k].shape) != expected[k].shape]
    extra = [k for k in state if k not in expected]
    if wrong or extra:
        raise ValueError(
            f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS!r} is not a RedNet-{cfg.MODEL.REDNET.DEPTH} "
            f"classifier of this config: missing/mis-shaped {wrong[:5]}, unexpected {extra[:5]}"
        )
    if comm.is_main_process():
        return export_backbone(cfg.MODEL.WEIGHTS, output, prefix=prefix)
    return {}


def main(args: argparse.Namespace) -> Any:
    """Train, evaluate (``--eval-only``) or export (``--export-backbone``) as the arguments say."""
    cfg = setup(args)
    if args.export_backbone:
        return export(cfg, args.export_backbone, args.export_prefix)
    if args.eval_only:
        resolve_dataset_root(cfg.DATASETS.CLS.ROOT)
        model = ClassificationTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return ClassificationTrainer.test(cfg, model)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    trainer = ClassificationTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


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
