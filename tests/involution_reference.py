"""The unfold formulation of involution in float64: the reference every op test compares to."""

import torch
import torch.nn.functional as F


def reference(x: torch.Tensor, weight: torch.Tensor, stride=1, padding=None, dilation=1):
    """Involution by unfold + multiply + sum in float64, on the inputs' device."""
    N, C, H, W = x.shape
    _, G, K, _, Ho, Wo = weight.shape
    if padding is None:
        padding = dilation * (K - 1) // 2
    cols = F.unfold(x.double(), K, dilation=dilation, padding=padding, stride=stride)
    cols = cols.view(N, G, C // G, K * K, Ho, Wo)
    out = (cols * weight.double().reshape(N, G, 1, K * K, Ho, Wo)).sum(3)
    return out.reshape(N, C, Ho, Wo)
