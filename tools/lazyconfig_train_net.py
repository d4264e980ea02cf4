#!/usr/bin/env python
"""Train or evaluate a model described by a LazyConfig ``.py`` file (configs/*/*.py).

The file defines ``model``, ``dataloader.{train,test,evaluator}``, ``optimizer``, ``lr_multiplier``
and ``train`` (configs/common/train.py lists its keys); ``key=value`` arguments override any of
them. Training is Detectron2's ``SimpleTrainer`` (``AMPTrainer`` with ``train.amp.enabled=True``)
with its LR-schedule, checkpoint, evaluation and writer hooks:

    python tools/lazyconfig_train_net.py \
        --config-file configs/Shapes-LazyConfig/faster_rcnn_rednet26_fpn.py
    python tools/lazyconfig_train_net.py --config-file CFG.py --eval-only train.init_checkpoint=W
    python tools/lazyconfig_train_net.py --config-file CFG.py --num-gpus 8 --resume

The data loaders are Detectron2's: the exact resume and the skipping of unreadable images of
train_net.py (YAML configs) are not part of this path.
"""

import d2_involution  # isort: skip  # noqa: F401  (first: detectron2 compat + registrations)
from typing import Any, Dict

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    create_ddp_model,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
    launch,
)
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm


def evaluate(cfg, model) -> Dict[str, Any]:
    """``dataloader.evaluator``'s results of ``model`` on ``dataloader.test`` ({} without one)."""
    if "evaluator" not in cfg.dataloader:
        return {}
    loader, evaluator = instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    results = inference_on_dataset(model, loader, evaluator)
    if comm.is_main_process():
        print_csv_format(results)
    return results


def train(cfg, resume: bool) -> Dict[str, Any]:
    """Train for ``train.max_iter`` iterations; returns the final evaluation's results."""
    model = instantiate(cfg.model).to(cfg.train.device)
    # The optimizer's parameters come from the model (inside the full-model clipping wrapper of
    # d2_involution.solver when the config uses it).
    cfg.optimizer.get("optimizer", cfg.optimizer).params.model = model
    optimizer = instantiate(cfg.optimizer)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer_class = AMPTrainer if cfg.train.amp.enabled else SimpleTrainer
    trainer = trainer_class(model, instantiate(cfg.dataloader.train), optimizer)
    checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    results: Dict[str, Any] = {}

    def evaluate_and_keep() -> Dict[str, Any]:
        results.update(evaluate(cfg, model))
        return results

    main_process = comm.is_main_process()
    trainer.register_hooks(  # None: not on this process
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (
                hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
                if main_process
                else None
            ),
            hooks.EvalHook(cfg.train.eval_period, evaluate_and_keep),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if main_process
                else None
            ),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    # A checkpoint holds the last finished iteration.
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return results


def main(args) -> Dict[str, Any]:
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    default_setup(cfg, args)
    if not args.eval_only:
        return train(cfg, args.resume)
    model = create_ddp_model(instantiate(cfg.model).to(cfg.train.device))
    DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
    return evaluate(cfg, model)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
