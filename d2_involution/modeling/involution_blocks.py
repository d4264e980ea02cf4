"""What the builders share: the one reader of ``MODEL.INVOLUTION`` and the heads' involution block.

The heads (:mod:`.rpn_head`, :mod:`.mask_head`) replace a Detectron2 3x3 conv + ReLU by
:func:`involution_relu`, as the official ``RPNHead_involution`` and ``FCNMaskHead_involution`` do.
"""

from collections import OrderedDict
from typing import Dict, Union

import fvcore.nn.weight_init as weight_init
from detectron2.config import CfgNode
from torch import nn

from ..layers import Involution, get_norm_layer, init_kernel_generators

__all__ = ["involution_args", "involution_relu"]


def involution_args(cfg: CfgNode) -> Dict[str, Union[int, str]]:
    """``Involution`` keyword arguments from ``MODEL.INVOLUTION``, for every builder.

    Returns ``kernel_size``, ``group_channels``, ``reduction_ratio`` and ``generator_init``; the
    kernel generator's norm is configured per place (``MODEL.REDNET.NORM``,
    ``MODEL.FPN.INVOLUTION_NORM``, ...).
    """
    inv = cfg.MODEL.INVOLUTION
    return {
        "kernel_size": inv.KERNEL_SIZE,
        "group_channels": inv.GROUP_CHANNELS,
        "reduction_ratio": inv.REDUCTION_RATIO,
        "generator_init": inv.GENERATOR_INIT,
    }


def involution_relu(
    channels: int,
    *,
    kernel_size: int = 7,
    group_channels: int = 16,
    reduction_ratio: int = 4,
    generator_norm: str = "BN",
    out_norm: str = "",
    generator_init: str = "official",
) -> nn.Sequential:
    """``Involution(C, K, 1)`` [+ ``out_norm``] + ReLU, named ``involution``, ``norm``, ``relu``.

    ``generator_norm`` is the norm inside the kernel generator; the convs are initialised as mmcv's
    ``ConvModule`` (and Detectron2's heads) do, with MSRA fill, then as ``generator_init`` says
    (:func:`~d2_involution.layers.init_kernel_generators`).
    """
    layers = OrderedDict()
    layers["involution"] = Involution(
        channels,
        kernel_size=kernel_size,
        stride=1,
        group_channels=group_channels,
        reduction_ratio=reduction_ratio,
        norm=generator_norm,
    )
    norm = get_norm_layer(out_norm, channels)
    if norm is not None:
        layers["norm"] = norm
    layers["relu"] = nn.ReLU()
    block = nn.Sequential(layers)
    for module in block.modules():
        if isinstance(module, nn.Conv2d):
            weight_init.c2_msra_fill(module)
    init_kernel_generators(block, generator_init)
    return block
