"""Normalisation layers by Detectron2 name, plus the detectors' frozen-statistics BatchNorm."""

from typing import Union

import torch
from detectron2.layers import get_norm as d2_get_norm
from torch import nn
from torch.nn import functional as F


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose running statistics never change but whose affine weights still train.

    This is OpenMMLab's ``norm_eval=True, requires_grad=True`` used by the official RedNet
    detectors: normalisation always uses the (pre-trained) running mean and variance, in training
    as in inference, while ``weight`` and ``bias`` receive gradients. Unlike Detectron2's
    ``FrozenBatchNorm2d``, whose affine parameters are frozen buffers, these are parameters.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


NORMS = {"FrozenStatsBN": FrozenStatsBatchNorm2d}


def get_norm_layer(norm: Union[str, nn.Module, None], out_channels: int) -> nn.Module:
    """Detectron2's ``get_norm`` plus "FrozenStatsBN"; "" or None means no norm (returns None)."""
    if norm is None or norm == "":
        return None
    if isinstance(norm, str) and norm in NORMS:
        return NORMS[norm](out_channels)
    try:
        return d2_get_norm(norm, out_channels)
    except KeyError:
        raise ValueError(
            f"norm: unknown normalisation {norm!r}; expected one of "
            f"'', 'BN', 'SyncBN', 'FrozenBN', 'GN', 'naiveSyncBN', {', '.join(map(repr, NORMS))}"
        ) from None
