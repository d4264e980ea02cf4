"""The package imports, adds its config keys and reports what the installed detectron2 lacks."""

from detectron2.config import get_cfg

import d2_involution
from d2_involution import compat


def test_add_involution_config_adds_subtrees():
    cfg = d2_involution.add_involution_config(get_cfg())
    assert cfg.MODEL.INVOLUTION.KERNEL_SIZE == 7
    assert cfg.MODEL.INVOLUTION.GROUP_CHANNELS == 16
    assert cfg.MODEL.REDNET.DEPTH in (26, 38, 50, 101, 152)
    # Merging a file that sets our keys must work on the extended config.
    cfg.merge_from_list(["MODEL.REDNET.DEPTH", "26", "MODEL.INVOLUTION.KERNEL_SIZE", "3"])
    assert cfg.MODEL.REDNET.DEPTH == 26 and cfg.MODEL.INVOLUTION.KERNEL_SIZE == 3


def test_compat_reports_gaps():
    gaps = compat.describe_gaps()
    if compat.HAS_COMPILED_OPS:
        assert not any("detectron2._C" in g for g in gaps)
    else:
        assert any("detectron2._C" in g for g in gaps)


def test_v06_fallback_runs_on_current_libraries():
    """The v0.6 modules that break on Pillow >= 10 / numpy >= 1.24 import and work."""
    import numpy as np
    from detectron2.data import transforms as T

    img = np.random.RandomState(0).randint(0, 255, (20, 30, 3)).astype(np.uint8)
    out = T.ExtentTransform((0, 0, 30, 20), (10, 15)).apply_image(img)
    assert out.shape == (10, 15, 3)


def test_detectron2_flop_analysis_imports_and_counts():
    """detectron2.utils.analysis imports (v0.6 needs compat: its export package wants caffe2)."""
    import torch
    from detectron2.utils.analysis import FlopCountAnalysis

    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    flops = FlopCountAnalysis(conv, (torch.zeros(1, 3, 10, 10),)).total()
    assert flops == 8 * 3 * 9 * 10 * 10
