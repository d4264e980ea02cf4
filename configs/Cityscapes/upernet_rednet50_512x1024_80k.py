# UPerNet, RedNet-50, 512 channels, auxiliary FCN head on res4: upernet_rednet50_512x1024_80k.yaml
# as a LazyConfig.
from ..common.data.cityscapes_sem_seg import dataloader  # noqa: F401
from ..common.models.upernet_rednet import model  # noqa: F401
from ..common.train_sem_seg import lr_multiplier, optimizer, train  # noqa: F401
