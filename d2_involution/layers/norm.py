"""Normalisation layers by Detectron2 name, plus the detectors' frozen-statistics BatchNorm.

"BN", "FrozenStatsBN" and "" need only PyTorch; every other name is looked up in detectron2 (which
is imported only then), so the layers work without detectron2 installed.
"""

from typing import Callable, Union

import torch
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


NORMS = {"BN": nn.BatchNorm2d, "FrozenStatsBN": FrozenStatsBatchNorm2d}
DETECTRON2_NORMS = ("SyncBN", "FrozenBN", "GN", "naiveSyncBN")


def get_norm_layer(
    norm: Union[str, Callable[[int], nn.Module], None], out_channels: int
) -> nn.Module:
    """Detectron2's ``get_norm`` plus "FrozenStatsBN"; "" or None means no norm (returns None).

    ``norm`` is a name or, as in Detectron2, a callable taking the channel count.
    """
    if norm is None or norm == "":
        return None
    if not isinstance(norm, str):
        return norm(out_channels)
    if norm in NORMS:
        return NORMS[norm](out_channels)
    try:
        from detectron2.layers import get_norm as d2_get_norm
    except ModuleNotFoundError as e:
        if e.name != "detectron2":
            raise
        raise ImportError(
            f"norm: {norm!r} is a Detectron2 normalisation and detectron2 is not installed; "
            f"without it use one of '', {', '.join(map(repr, NORMS))}"
        ) from e
    try:
        return d2_get_norm(norm, out_channels)
    except KeyError:
        raise ValueError(
            f"norm: unknown normalisation {norm!r}; expected one of "
            f"'', {', '.join(map(repr, NORMS))}, {', '.join(map(repr, DETECTRON2_NORMS))}"
        ) from None
