"""``RedNetClassifier``: the official ImageNet RedNets (backbone, global average pool, ``fc``)."""

from typing import Dict, Mapping, Sequence, Union

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone
from torch import nn
from torch.nn import functional as F

from ..modeling import build_rednet
from .config import IMAGENET_RGB_MEAN, IMAGENET_RGB_STD

__all__ = ["RedNetClassifier"]


@META_ARCH_REGISTRY.register()
class RedNetClassifier(nn.Module):
    """A backbone's last feature, global average pooling and ``fc``: the official ImageNet RedNets.

    Built as ``RedNetClassifier(backbone, num_classes)`` or from a classification config
    (``build_model(cfg)`` with ``MODEL.META_ARCHITECTURE "RedNetClassifier"``: RedNet from
    ``MODEL.REDNET``/``MODEL.INVOLUTION``, stem involution 3x3, ``res5`` output). State-dict keys
    are ``backbone.*`` (the detection backbone's names) and ``fc.*`` (the official ``head.fc.*``);
    with 1000 classes the parameter counts are the official ones (RedNet-26: 9,233,166;
    -38: 12,386,986; -50: 15,540,806; -101: 25,652,950; -152: 33,984,582).

    ``forward`` takes either a float tensor that is already normalised (returns logits, like a
    torchvision model) or a batch dict from the classification loader, ``{"image": uint8 RGB
    (N, 3, H, W), "label": (N,)}``: the images are normalised with ``pixel_mean``/``pixel_std``
    (0-255 scale); in training it returns ``{"loss_cls": label-smoothed cross-entropy}``,
    otherwise the logits.
    """

    @configurable
    def __init__(
        self,
        backbone: Backbone,
        num_classes: int = 1000,
        *,
        label_smoothing: float = 0.0,
        pixel_mean: Sequence[float] = IMAGENET_RGB_MEAN,
        pixel_std: Sequence[float] = IMAGENET_RGB_STD,
    ):
        super().__init__()
        if not isinstance(backbone, Backbone):
            raise TypeError(
                "RedNetClassifier: backbone must be a Detectron2 Backbone (e.g. from "
                f"build_rednet), got {type(backbone).__name__}"
            )
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
        self.backbone = backbone
        self.in_feature, shape = max(backbone.output_shape().items(), key=lambda kv: kv[1].stride)
        self.fc = nn.Linear(shape.channels, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        self.num_classes = num_classes
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), False)

    @classmethod
    def from_config(cls, cfg) -> dict:
        return {
            "backbone": build_rednet(cfg, out_features=["res5"]),
            "num_classes": cfg.MODEL.CLS.NUM_CLASSES,
            "label_smoothing": cfg.MODEL.CLS.LABEL_SMOOTHING,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of normalised float images (N, 3, H, W)."""
        features = self.backbone(images)[self.in_feature]
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
