"""The ``Involution`` module: kernel generation (paper, Sec. 3) followed by the involution op."""

from typing import Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from ..ops import has_fused_kernel, involution, involution_fused
from .norm import get_norm_layer


class ConvNormAct(nn.Module):
    """Conv2d, optional norm, optional ReLU, with the official checkpoints' names (conv, bn)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        bias: Optional[bool] = None,
        norm: str = "BN",
        activation: bool = True,
    ):
        super().__init__()
        if bias is None:
            bias = not norm
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias
        )
        self.bn = get_norm_layer(norm, out_channels)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        # In place: x is this module's own new tensor (the norm's or the conv's output).
        return torch.relu_(x) if self.activation else x


class Involution(nn.Module):
    """Involution with its kernel generator.

    Kernel generation follows the paper and the official code: AvgPool(stride) when stride > 1,
    1x1 conv C -> C/r (no bias) + norm + ReLU, 1x1 conv C/r -> K*K*G (with bias); G = C /
    group_channels. For an odd input size with stride > 1 the official code pools to floor(H/s)
    kernels but produces ceil(H/s) outputs; here the pooling uses ``ceil_mode=True`` so the kernel
    grid always equals the output grid (the last row/column averages the pixels that exist). For
    even sizes this is exactly the official computation.

    ``fused``: compute the K*K*G weights inside the aggregation from conv1's output
    (``ops.involution_fused`` with conv2's weight and bias), so that they are never stored in a
    tensor; the backward regenerates them. The parameters are the same (``conv2.conv.weight`` /
    ``bias``), so checkpoints do not change. ``None`` (default) fuses where it was measured to be
    faster (:func:`fuse_by_default`: on the CPU up to 64 channels; never on CUDA until a fused
    CUDA kernel exists and is measured); ``False`` always runs the unfused path (for checking).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        stride: int = 1,
        group_channels: int = 16,
        reduction_ratio: int = 4,
        norm: str = "BN",
        dilation: int = 1,
        fused: Optional[bool] = None,
    ):
        super().__init__()
        if dilation < 1:
            raise ValueError(f"Involution: dilation must be >= 1, got {dilation}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"Involution: kernel_size must be a positive odd int, got {kernel_size}"
            )
        if stride < 1:
            raise ValueError(f"Involution: stride must be >= 1, got {stride}")
        if group_channels < 1 or channels % group_channels != 0:
            raise ValueError(
                f"Involution: channels ({channels}) must be divisible by group_channels "
                f"({group_channels})"
            )
        if reduction_ratio < 1 or channels // reduction_ratio < 1:
            raise ValueError(
                f"Involution: reduction_ratio must be in [1, channels={channels}], "
                f"got {reduction_ratio}"
            )
        if fused not in (None, True, False):
            raise ValueError(f"Involution: fused must be None, True or False, got {fused!r}")
        self.fused = fused
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.groups = channels // group_channels
        self.avgpool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
        self.conv1 = ConvNormAct(channels, channels // reduction_ratio, norm=norm)
        self.conv2 = ConvNormAct(
            channels // reduction_ratio,
            kernel_size * kernel_size * self.groups,
            bias=True,
            norm="",
            activation=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"Involution: expected input (N, {self.channels}, H, W), got {tuple(x.shape)}"
            )
        reduced = self.conv1(self._pool(x))
        K = self.kernel_size
        if self._fuse(x):
            conv = self.conv2.conv
            return involution_fused(
                x, reduced, conv.weight, conv.bias, K, stride=self.stride, dilation=self.dilation
            )
        weight = self.conv2(reduced)
        N, _, Ho, Wo = weight.shape
        # A view, channels_last included (only the channel dim is split): on CPU tensors the
        # kernels read that (N, Ho, Wo, G, K, K) order as it is; see ``ops.involution``.
        weight = weight.view(N, self.groups, K, K, Ho, Wo)
        return involution(x, weight, stride=self.stride, dilation=self.dilation)

    def start_static(self, dynamic_scale: float = 0.1) -> None:
        """Re-initialise the kernel generator so the involution starts as a group-shared conv.

        conv2's bias (the part of every generated kernel that does not depend on the position)
        becomes a random K x K kernel per group (Kaiming normal, fan-in K*K) and its weight (the
        position-specific part) is scaled by ``dynamic_scale``. With the official init (bias 0)
        each pixel starts with its own random kernel and nothing shared, which from scratch
        learns far more slowly (docs/models.md, "Kernel-generator init"). The parameters and
        their shapes are unchanged.
        """
        if not 0.0 <= dynamic_scale <= 1.0:
            raise ValueError(f"Involution: dynamic_scale must be in [0, 1], got {dynamic_scale}")
        conv = self.conv2.conv
        K = self.kernel_size
        with torch.no_grad():
            conv.weight.mul_(dynamic_scale)
            nn.init.normal_(conv.bias, std=(2.0 / (K * K)) ** 0.5)

    def _fuse(self, x: torch.Tensor) -> bool:
        if self.fused is not None:
            return self.fused
        return fuse_by_default(self.channels, x.device)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """``self.avgpool`` (ceil_mode). Under torch.compile, for sizes not divisible by the
        stride, the same average is computed with floor-mode pooling of a zero-padded input
        divided by the windows' real sizes: Inductor's avg_pool2d backward divides the windows
        that ceil_mode lets overhang by the full window size (pytorch/pytorch#198119), which would
        give silently wrong gradients."""
        s = self.stride
        H, W = x.shape[-2:]
        if s == 1 or not torch.compiler.is_compiling() or (H % s == 0 and W % s == 0):
            return self.avgpool(x)
        pad = (0, (s - W % s) % s, 0, (s - H % s) % s)
        ones = x.new_ones((1, 1, H, W))
        return F.avg_pool2d(F.pad(x, pad), s, s) / F.avg_pool2d(F.pad(ones, pad), s, s)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"dilation={self.dilation}, groups={self.groups}, fused={self.fused}"
        )


#: How the kernel generators of a model start (``MODEL.INVOLUTION.GENERATOR_INIT``): "official"
#: keeps the builders' fill (the official RedNets' init); "static" then applies
#: :meth:`Involution.start_static` to every involution.
GENERATOR_INITS = ("official", "static")


def init_kernel_generators(module: nn.Module, generator_init: str) -> None:
    """Apply ``generator_init`` (one of :data:`GENERATOR_INITS`) to every involution of ``module``;
    call it after the module's own weight fill."""
    if generator_init not in GENERATOR_INITS:
        raise ValueError(f"generator_init must be one of {GENERATOR_INITS}, got {generator_init!r}")
    if generator_init == "static":
        for m in module.modules():
            if isinstance(m, Involution):
                m.start_static()


#: ``fused=None`` fuses, on a device type with a fused kernel, up to this many channels. CPU: the
#: fused kernel regenerates the weights with its own small matrix products (K*K*G x C/4 per pixel,
#: growing as C^2), which beat the unfused 1x1 convolution plus the weight tensor's memory traffic
#: at 64 channels (RedNet's res2) but lose at 128 (0.85-0.90x forward+backward in NCHW) and more
#: from 256 on (docs/benchmarks.md, tools/benchmark_involution.py --layer, 2026-12-02). No CUDA
#: entry until a fused CUDA kernel is measured.
FUSE_MAX_CHANNELS = {"cpu": 64}


def fuse_by_default(channels: int, device: Union[str, torch.device] = "cpu") -> bool:
    """Whether ``Involution(fused=None)`` fuses kernel generation at ``channels`` on ``device``."""
    device = torch.device(device)
    limit = FUSE_MAX_CHANNELS.get(device.type)
    return limit is not None and channels <= limit and has_fused_kernel(device)
