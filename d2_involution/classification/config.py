"""Classification config: Detectron2's ``get_cfg`` + d2_involution's keys + a classification tree.

Keys added here (all other keys keep Detectron2's meaning):

* ``MODEL.CLS.NUM_CLASSES`` (0: the number of class folders in the training split),
  ``MODEL.CLS.LABEL_SMOOTHING``.
* ``DATASETS.CLS.ROOT``: an ImageNet-style folder (``ROOT/TRAIN_SPLIT/<class>/*``,
  ``ROOT/VAL_SPLIT/<class>/*``) or the name of a built-in folder generated on first use
  (``"shapes_cls"``, under ``$DETECTRON2_DATASETS``); ``DATASETS.CLS.TRAIN_SPLIT``, ``VAL_SPLIT``.
* ``INPUT.CLS.*``: training RandomResizedCrop size/scale/ratio and flip probability, evaluation
  resize and center-crop sizes.
* ``SOLVER.CLS.EPOCHS`` (> 0: ``SOLVER.MAX_ITER`` is computed from it),
  ``SOLVER.CLS.REFERENCE_BATCH`` and ``SOLVER.CLS.ACCUMULATION_STEPS`` (see
  :func:`scale_solver_to_actual_batch`).
* ``TEST.CLS.IMS_PER_GPU`` (evaluation batch per process), ``TEST.CLS.TOPK``.

``MODEL.META_ARCHITECTURE`` is ``"RedNetClassifier"`` (``build_model(cfg)`` builds the classifier).
Detectron2 keys this trainer uses with their usual meaning: ``SOLVER.IMS_PER_BATCH`` (total batch of
one optimizer step), ``SOLVER.REFERENCE_WORLD_SIZE``, ``SOLVER.BASE_LR``, ``MOMENTUM``,
``NESTEROV``, ``WEIGHT_DECAY``, ``WEIGHT_DECAY_NORM``, ``LR_SCHEDULER_NAME``, ``WARMUP_*``,
``CHECKPOINT_PERIOD``, ``AMP.ENABLED``, ``TEST.EVAL_PERIOD``, ``DATALOADER.NUM_WORKERS``,
``MODEL.PIXEL_MEAN``/``PIXEL_STD`` (RGB, 0-255 scale), ``MODEL.REDNET.*``, ``MODEL.INVOLUTION.*``,
``MODEL.WEIGHTS``, ``OUTPUT_DIR``, ``SEED``.
"""

import logging
import math

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from ..config import add_involution_config

__all__ = ["add_classification_config", "get_cls_cfg", "scale_solver_to_actual_batch"]

logger = logging.getLogger(__name__)

#: ImageNet RGB mean/std on the 0-255 scale (what the official mmcls RedNets were trained with).
IMAGENET_RGB_MEAN = [123.675, 116.28, 103.53]
IMAGENET_RGB_STD = [58.395, 57.12, 57.375]


def add_classification_config(cfg: CN) -> CN:
    """Add the classification keys (and classification defaults) to a config, in place."""
    cfg.MODEL.CLS = CN()
    cfg.MODEL.CLS.NUM_CLASSES = 0
    cfg.MODEL.CLS.LABEL_SMOOTHING = 0.0

    # The ImageNet classifiers: stem involution 3x3, trainable BatchNorm, only res5 is needed.
    cfg.MODEL.META_ARCHITECTURE = "RedNetClassifier"
    cfg.MODEL.REDNET.STEM_INVOLUTION_KERNEL = 3
    cfg.MODEL.REDNET.NORM = "BN"
    cfg.MODEL.REDNET.OUT_FEATURES = ["res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.PIXEL_MEAN = list(IMAGENET_RGB_MEAN)
    cfg.MODEL.PIXEL_STD = list(IMAGENET_RGB_STD)
    cfg.INPUT.FORMAT = "RGB"

    cfg.DATASETS.CLS = CN()
    cfg.DATASETS.CLS.ROOT = "shapes_cls"
    cfg.DATASETS.CLS.TRAIN_SPLIT = "train"
    cfg.DATASETS.CLS.VAL_SPLIT = "val"

    cfg.INPUT.CLS = CN()
    cfg.INPUT.CLS.TRAIN_CROP_SIZE = 224
    cfg.INPUT.CLS.TRAIN_SCALE = (0.08, 1.0)
    cfg.INPUT.CLS.TRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)
    cfg.INPUT.CLS.HFLIP_PROB = 0.5
    cfg.INPUT.CLS.TEST_RESIZE = 256
    cfg.INPUT.CLS.TEST_CROP_SIZE = 224

    cfg.SOLVER.CLS = CN()
    # > 0: MAX_ITER = ceil(EPOCHS * number of training images / actual total batch).
    cfg.SOLVER.CLS.EPOCHS = 0
    # The total batch BASE_LR and WARMUP_ITERS are written for; 0 means SOLVER.IMS_PER_BATCH.
    cfg.SOLVER.CLS.REFERENCE_BATCH = 0
    # Micro-batches whose gradients are summed before one optimizer step.
    cfg.SOLVER.CLS.ACCUMULATION_STEPS = 1
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupCosineLR"

    cfg.TEST.CLS = CN()
    cfg.TEST.CLS.IMS_PER_GPU = 64
    cfg.TEST.CLS.TOPK = (1, 5)
    cfg.TEST.PRECISE_BN.ENABLED = False
    return cfg


def get_cls_cfg() -> CN:
    """Detectron2's default config with d2_involution's keys and the classification keys."""
    cfg = get_cfg()
    add_involution_config(cfg)
    add_classification_config(cfg)
    return cfg


def scale_solver_to_actual_batch(cfg: CN, world_size: int, num_train_images: int) -> CN:
    """Resolve the per-GPU batch, the actual total batch, the LR, warm-up and MAX_ITER; in place.

    The rule (applied once, at set-up; the result is what the log and ``config.yaml`` show):

    * per-GPU batch ``b``: ``IMS_PER_BATCH / REFERENCE_WORLD_SIZE`` when ``REFERENCE_WORLD_SIZE``
      > 0 (the recipe's 32 images/GPU whatever the number of GPUs), otherwise
      ``IMS_PER_BATCH / (world_size * ACCUMULATION_STEPS)``.
    * actual total batch ``B = b * world_size * ACCUMULATION_STEPS`` (images per optimizer step).
    * with ``R = REFERENCE_BATCH`` (or the configured ``IMS_PER_BATCH`` when 0):
      ``BASE_LR *= B / R`` (linear scaling), ``WARMUP_ITERS = round(WARMUP_ITERS * R / B)`` (the
      same number of warm-up images), ``CHECKPOINT_PERIOD`` and ``TEST.EVAL_PERIOD`` likewise.
    * ``MAX_ITER = ceil(EPOCHS * num_train_images / B)`` when ``SOLVER.CLS.EPOCHS`` > 0.

    ``IMS_PER_BATCH`` becomes ``B``, ``REFERENCE_WORLD_SIZE`` 0 and ``REFERENCE_BATCH`` ``B``, so
    applying the rule again changes nothing.
    """
    s = cfg.SOLVER
    accum = s.CLS.ACCUMULATION_STEPS
    per_gpu = _per_gpu_batch(s, world_size, accum)
    actual = per_gpu * world_size * accum
    reference = s.CLS.REFERENCE_BATCH or s.IMS_PER_BATCH
    frozen = cfg.is_frozen()
    cfg.defrost()
    _rescale_solver(cfg, actual / reference)
    if s.CLS.EPOCHS > 0:
        if num_train_images < 1:
            raise ValueError(f"num_train_images must be >= 1, got {num_train_images}")
        s.MAX_ITER = int(math.ceil(s.CLS.EPOCHS * num_train_images / actual))
    s.IMS_PER_BATCH = actual
    s.REFERENCE_WORLD_SIZE = 0
    s.CLS.REFERENCE_BATCH = actual
    if frozen:
        cfg.freeze()
    logger.info(
        f"Batch: {per_gpu} images/GPU x {world_size} GPUs x {accum} accumulation steps = {actual} "
        f"per optimizer step (reference {reference}): BASE_LR {s.BASE_LR:.6g}, WARMUP_ITERS "
        f"{s.WARMUP_ITERS}, MAX_ITER {s.MAX_ITER}"
        + (f" ({s.CLS.EPOCHS} epochs of {num_train_images} images)" if s.CLS.EPOCHS > 0 else "")
    )
    return cfg


def _per_gpu_batch(s: CN, world_size: int, accum: int) -> int:
    """Images per GPU and micro-batch that ``SOLVER.IMS_PER_BATCH`` asks for (see above)."""
    if not isinstance(accum, int) or accum < 1:
        raise ValueError(f"SOLVER.CLS.ACCUMULATION_STEPS must be an int >= 1, got {accum!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    configured = s.IMS_PER_BATCH
    if s.REFERENCE_WORLD_SIZE > 0:
        if configured % s.REFERENCE_WORLD_SIZE != 0:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH ({configured}) must be divisible by "
                f"SOLVER.REFERENCE_WORLD_SIZE ({s.REFERENCE_WORLD_SIZE})"
            )
        per_gpu = configured // s.REFERENCE_WORLD_SIZE
    else:
        if configured % (world_size * accum) != 0:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH ({configured}) must be divisible by world size x "
                f"SOLVER.CLS.ACCUMULATION_STEPS ({world_size} x {accum})"
            )
        per_gpu = configured // (world_size * accum)
    if per_gpu < 1:
        raise ValueError(f"per-GPU batch must be >= 1, got {per_gpu} (SOLVER.IMS_PER_BATCH)")
    return per_gpu


def _rescale_solver(cfg: CN, scale: float) -> None:
    """Linear LR scaling by ``scale``; warm-up, checkpoint and eval periods in images kept."""
    s = cfg.SOLVER
    s.BASE_LR = s.BASE_LR * scale
    s.WARMUP_ITERS = int(round(s.WARMUP_ITERS / scale))
    s.CHECKPOINT_PERIOD = max(1, int(round(s.CHECKPOINT_PERIOD / scale)))
    if cfg.TEST.EVAL_PERIOD > 0:
        cfg.TEST.EVAL_PERIOD = max(1, int(round(cfg.TEST.EVAL_PERIOD / scale)))


def per_gpu_batch(cfg: CN, world_size: int) -> int:
    """Images per process and micro-batch, once :func:`scale_solver_to_actual_batch` has run."""
    total = cfg.SOLVER.IMS_PER_BATCH
    accum = cfg.SOLVER.CLS.ACCUMULATION_STEPS
    if cfg.SOLVER.REFERENCE_WORLD_SIZE > 0 or total % (world_size * accum) != 0:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({total}) is not resolved for world size {world_size} x "
            f"accumulation {accum}; call scale_solver_to_actual_batch first"
        )
    return total // (world_size * accum)
