"""Config keys added by d2_involution: ``MODEL.INVOLUTION``, ``MODEL.REDNET`` and the heads'."""

from detectron2.config import CfgNode as CN


def add_involution_config(cfg: CN) -> CN:
    """Add d2_involution's keys to a Detectron2 config, in place; returns it for chaining."""
    _add_involution_keys(cfg)
    _add_rednet_keys(cfg)
    _add_head_keys(cfg)
    _add_training_keys(cfg)
    return cfg


def _add_involution_keys(cfg: CN) -> None:
    cfg.MODEL.INVOLUTION = CN()
    # Spatial extent K of the involution kernel (odd). Blocks, FPN and heads use it.
    cfg.MODEL.INVOLUTION.KERNEL_SIZE = 7
    # Channels per involution group: G = C // GROUP_CHANNELS kernels are generated per pixel.
    cfg.MODEL.INVOLUTION.GROUP_CHANNELS = 16
    # The kernel generator reduces C to C // REDUCTION_RATIO channels before expanding to K*K*G.
    cfg.MODEL.INVOLUTION.REDUCTION_RATIO = 4


def _add_rednet_keys(cfg: CN) -> None:
    cfg.MODEL.REDNET = CN()
    # 26, 38, 50, 101 or 152.
    cfg.MODEL.REDNET.DEPTH = 50
    cfg.MODEL.REDNET.OUT_FEATURES = ["res4"]
    # "BN", "SyncBN", "FrozenBN", "GN", "FrozenStatsBN" (running stats fixed, affine trains).
    cfg.MODEL.REDNET.NORM = "FrozenStatsBN"
    cfg.MODEL.REDNET.STEM_OUT_CHANNELS = 64
    # Involution kernel of the stem: 3 in the ImageNet classifiers, 7 in the official detectors.
    cfg.MODEL.REDNET.STEM_INVOLUTION_KERNEL = 7
    cfg.MODEL.REDNET.RES2_OUT_CHANNELS = 256
    # 1 or 2: dilation of the res5 involutions (res5 then keeps stride 16).
    cfg.MODEL.REDNET.RES5_DILATION = 1
    # Zero-initialise the last norm of each block (the official init).
    cfg.MODEL.REDNET.ZERO_INIT_RESIDUAL = True


def _add_head_keys(cfg: CN) -> None:
    pass


def _add_training_keys(cfg: CN) -> None:
    # Poly schedule (SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR", see d2_involution.solver):
    # lr = BASE_LR * max((1 - iter / MAX_ITER) ** POLY_LR_POWER, POLY_LR_CONSTANT_ENDING).
    cfg.SOLVER.POLY_LR_POWER = 0.9
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0
    # Semantic segmentation crops (RandomCrop_CategoryAreaConstraint): retry the crop when one
    # category covers more than this fraction of it; 1.0 disables the check. Same key as
    # Detectron2's DeepLab/PointRend projects, so their configs merge with ours.
    if "SINGLE_CATEGORY_MAX_AREA" not in cfg.INPUT.CROP:
        cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
