"""Training helpers for train_net.py: evaluators by dataset, semantic-seg augmentation."""

from .build import build_evaluator, build_sem_seg_train_aug

__all__ = ["build_evaluator", "build_sem_seg_train_aug"]
