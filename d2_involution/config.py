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
    # How the kernel generators start: "official" (the official RedNets' fill) or "static" (each
    # involution starts as a group-shared KxK conv plus a small position-specific part; learns far
    # faster from scratch, docs/training.md). Only matters for weights not loaded from a file.
    cfg.MODEL.INVOLUTION.GENERATOR_INIT = "official"


def _add_rednet_keys(cfg: CN) -> None:
    cfg.MODEL.REDNET = CN()
    # 26, 38, 50, 101 or 152.
    cfg.MODEL.REDNET.DEPTH = 50
    cfg.MODEL.REDNET.OUT_FEATURES = ["res4"]
    # "BN", "SyncBN", "FrozenBN", "FrozenStatsBN" (running stats fixed, affine trains); not "GN",
    # whose 32 groups do not fit the involution kernel generators.
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
    # Norm inside the kernel generator of the involution FPN's output blocks (official: BN).
    cfg.MODEL.FPN.INVOLUTION_NORM = "BN"
    # RetinaNet P7 = conv(relu(P6)) in Detectron2; the official RedNet RetinaNet neck has no ReLU.
    cfg.MODEL.FPN.RELU_BEFORE_P7 = False
    # Kernel-generator norm of InvolutionRPNHead and InvolutionMaskHead (official: BN).
    cfg.MODEL.RPN.INVOLUTION_NORM = "BN"
    cfg.MODEL.ROI_MASK_HEAD.INVOLUTION_NORM = "BN"
    # UPerNetHead (MODEL.SEM_SEG_HEAD.NAME = "UPerNetHead"): uses SEM_SEG_HEAD.IN_FEATURES (C2..C5),
    # NUM_CLASSES, IGNORE_VALUE, NORM, LOSS_WEIGHT, and these.
    cfg.MODEL.SEM_SEG_HEAD.UPERNET = CN()
    # Pyramid pooling module on the last in-feature: adaptive average pools to these sizes.
    cfg.MODEL.SEM_SEG_HEAD.UPERNET.POOL_SCALES = [1, 2, 3, 6]
    cfg.MODEL.SEM_SEG_HEAD.UPERNET.CHANNELS = 512
    # Dropout before the 1x1 classifiers (decode and auxiliary heads).
    cfg.MODEL.SEM_SEG_HEAD.UPERNET.DROPOUT = 0.1
    # Auxiliary FCN head (training only): feature, channels, number of 3x3 convs, loss weight.
    # AUX_LOSS_WEIGHT 0 removes the auxiliary head.
    cfg.MODEL.SEM_SEG_HEAD.UPERNET.AUX_IN_FEATURE = "res4"
    cfg.MODEL.SEM_SEG_HEAD.UPERNET.AUX_CHANNELS = 256
    cfg.MODEL.SEM_SEG_HEAD.UPERNET.AUX_NUM_CONVS = 1
    cfg.MODEL.SEM_SEG_HEAD.UPERNET.AUX_LOSS_WEIGHT = 0.4


def _add_training_keys(cfg: CN) -> None:
    # "SGD" (Detectron2's optimizer) or "ADAMW" (torch.optim.AdamW, BASE_LR and WEIGHT_DECAY as
    # its lr and weight_decay); the name and values follow Detectron2's Panoptic-DeepLab project.
    cfg.SOLVER.OPTIMIZER = "SGD"
    # Poly schedule (SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR", see d2_involution.solver):
    # lr = BASE_LR * max((1 - iter / MAX_ITER) ** POLY_LR_POWER, POLY_LR_CONSTANT_ENDING).
    cfg.SOLVER.POLY_LR_POWER = 0.9
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0
    # Semantic segmentation crops (RandomCrop_CategoryAreaConstraint): retry the crop when one
    # category covers more than this fraction of it; 1.0 disables the check. Same key as
    # Detectron2's DeepLab/PointRend projects, so their configs merge with ours.
    if "SINGLE_CATEGORY_MAX_AREA" not in cfg.INPUT.CROP:
        cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
