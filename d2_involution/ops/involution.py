"""``involution(x, weight)``: per-pixel, per-group spatial kernels applied to a feature map.

out[n, c, i, j] = sum_{u,v<K} weight[n, g(c), u, v, i, j] * x[n, c, i*s + u*d - p, j*s + v*d - p]
with g(c) = c // (C // G) (contiguous channel groups, as the official code).
"""
from typing import Optional

import torch


def involution_output_size(
    size: int, kernel_size: int, stride: int = 1, padding: Optional[int] = None, dilation: int = 1
) -> int:
    """Output extent along one axis (the convolution formula)."""
    if padding is None:
        padding = dilation * (kernel_size - 1) // 2
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def _check_args(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int):
    if x.dim() != 4:
        raise ValueError(f"involution: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 6:
        raise ValueError(
            f"involution: weight must be 6-D (N, G, K, K, Ho, Wo), got shape {tuple(weight.shape)}"
        )


def involution(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: int = 1,
    padding: Optional[int] = None,
    dilation: int = 1,
) -> torch.Tensor:
    """Apply involution. x: (N, C, H, W); weight: (N, G, K, K, Ho, Wo). Returns (N, C, Ho, Wo)."""
    K = weight.shape[2]
    if padding is None:
        padding = dilation * (K - 1) // 2
    _check_args(x, weight, stride, padding, dilation)
    return _involution_shifted(x, weight, stride, padding, dilation)


def _involution_shifted(
    x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """Pure-PyTorch reference: accumulate K*K shifted, strided views of the padded input."""
    N, C, H, W = x.shape
    G, K = weight.shape[1], weight.shape[2]
    Ho, Wo = weight.shape[4], weight.shape[5]
    xp = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    xp = xp.view(N, G, C // G, H + 2 * padding, W + 2 * padding)
    out = x.new_zeros((N, G, C // G, Ho, Wo))
    for u in range(K):
        for v in range(K):
            hs, ws = u * dilation, v * dilation
            he, we = hs + (Ho - 1) * stride + 1, ws + (Wo - 1) * stride + 1
            patch = xp[..., hs:he:stride, ws:we:stride]
            out = out + patch * weight[:, :, u, v].unsqueeze(2)
    return out.view(N, C, Ho, Wo)
