"""``RedNetClassifier``: the official ImageNet RedNets (backbone, global average pool, ``fc``)."""

from typing import Dict, Mapping, Sequence, Union

import torch
from detectron2.config import CfgNode
from torch import nn
from torch.nn import functional as F

from ..modeling.rednet import build_rednet
from .config import IMAGENET_RGB_MEAN, IMAGENET_RGB_STD

__all__ = ["RedNetClassifier", "build_classifier"]


class RedNetClassifier(nn.Module):
    """RedNet backbone (stem involution 3x3, ``res5`` output) + global average pooling + ``fc``.

    State-dict keys are ``backbone.*`` (the detection backbone's names) and ``fc.*`` (the official
    ``head.fc.*``); with 1000 classes the parameter counts are the official ones (RedNet-26:
    9,233,166; -38: 12,386,986; -50: 15,540,806; -101: 25,652,950; -152: 33,984,582).

    ``forward`` takes either a float tensor that is already normalised (returns logits, like a
    torchvision model) or a batch dict from the classification loader, ``{"image": uint8 RGB
    (N, 3, H, W), "label": (N,)}``: the images are normalised with ``pixel_mean``/``pixel_std``
    (0-255 scale); in training it returns ``{"loss_cls": label-smoothed cross-entropy}``,
    otherwise the logits.
    """

    def __init__(
        self,
        depth: int = 50,
        num_classes: int = 1000,
        *,
        norm: str = "BN",
        label_smoothing: float = 0.0,
        pixel_mean: Sequence[float] = IMAGENET_RGB_MEAN,
        pixel_std: Sequence[float] = IMAGENET_RGB_STD,
        stem_involution_kernel: int = 3,
        kernel_size: int = 7,
        group_channels: int = 16,
        reduction_ratio: int = 4,
        zero_init_residual: bool = True,
        stem_out_channels: int = 64,
        res2_out_channels: int = 256,
    ):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f"RedNetClassifier: num_classes must be an int >= 1, got {num_classes!r}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(
                f"RedNetClassifier: label_smoothing must be in [0, 1), got {label_smoothing!r}"
            )
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError(
                f"RedNetClassifier: pixel_mean/pixel_std need 3 values, got {list(pixel_mean)} "
                f"and {list(pixel_std)}"
            )
        self.backbone = build_rednet(
            depth,
            stem_involution_kernel=stem_involution_kernel,
            norm=norm,
            out_features=["res5"],
            kernel_size=kernel_size,
            group_channels=group_channels,
            reduction_ratio=reduction_ratio,
            zero_init_residual=zero_init_residual,
            stem_out_channels=stem_out_channels,
            res2_out_channels=res2_out_channels,
        )
        channels = self.backbone.output_shape()["res5"].channels
        self.fc = nn.Linear(channels, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        self.num_classes = num_classes
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of normalised float images (N, 3, H, W)."""
        features = self.backbone(images)["res5"]
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))

    def forward(
        self, inputs: Union[torch.Tensor, Mapping[str, torch.Tensor]]
    ) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        if isinstance(inputs, torch.Tensor):
            return self.classify(inputs)
        if not isinstance(inputs, Mapping) or "image" not in inputs:
            raise TypeError(
                "RedNetClassifier: expected a normalised image tensor or a batch dict with "
                f"'image', got {type(inputs).__name__}"
            )
        images = inputs["image"].to(self.device, non_blocking=True).float()
        images = (images - self.pixel_mean) / self.pixel_std
        logits = self.classify(images)
        if not self.training:
            return logits
        labels = inputs["label"].to(self.device, non_blocking=True)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return {"loss_cls": loss}


def build_classifier(cfg: CfgNode, num_classes: int) -> RedNetClassifier:
    """A ``RedNetClassifier`` from ``MODEL.REDNET``, ``MODEL.INVOLUTION`` and ``MODEL.CLS``,
    moved to ``MODEL.DEVICE``."""
    r, inv = cfg.MODEL.REDNET, cfg.MODEL.INVOLUTION
    model = RedNetClassifier(
        r.DEPTH,
        num_classes,
        norm=r.NORM,
        label_smoothing=cfg.MODEL.CLS.LABEL_SMOOTHING,
        pixel_mean=cfg.MODEL.PIXEL_MEAN,
        pixel_std=cfg.MODEL.PIXEL_STD,
        stem_involution_kernel=r.STEM_INVOLUTION_KERNEL,
        kernel_size=inv.KERNEL_SIZE,
        group_channels=inv.GROUP_CHANNELS,
        reduction_ratio=inv.REDUCTION_RATIO,
        zero_init_residual=r.ZERO_INIT_RESIDUAL,
        stem_out_channels=r.STEM_OUT_CHANNELS,
        res2_out_channels=r.RES2_OUT_CHANNELS,
    )
    return model.to(torch.device(cfg.MODEL.DEVICE))
