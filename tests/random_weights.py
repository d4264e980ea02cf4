"""Random norm statistics and affine weights, so that no block of a fresh model is an identity.

Fresh RedNets zero-initialise each block's last norm (``bn3``), which makes the residual blocks
identities; comparisons between two ways of running a model (export, compile, DDP, LazyConfig)
use these weights instead, so that every layer changes the output.
"""

import torch


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every module with running statistics gets random mean/var/weight/bias; returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not hasattr(m, "running_var") or m.running_var is None:
                continue
            n = m.running_var.numel()
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            if m.weight is not None:  # affine=False: e.g. the per-level BNs of a RetinaNet head
                m.weight.copy_(torch.rand(n, generator=g) * 0.4 + 0.2)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model
