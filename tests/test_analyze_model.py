"""tools/analyze_model.py: parameters and FLOPs (involution included) as markdown."""

import importlib.util
from pathlib import Path

import pytest
import torch
from fvcore.nn import FlopCountAnalysis

from d2_involution.layers import Involution

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("d2inv_analyze", REPO / "tools" / "analyze_model.py")
analyze = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(analyze)


def test_classifier_matches_official_params_and_paper_flops():
    row = analyze.analyze_classifier(26)
    assert row["params"] == 9_233_166
    # Paper (mmcv counter): 1.73 GFLOPs; fvcore counts the same convs/involutions/fc.
    assert row["flops"] / 1e9 == pytest.approx(1.73, rel=0.05)
    assert "| RedNet-26 | 224x224 | 9.23 | 9.23 |" in analyze.classifier_table([row])


def test_involution_flops_are_counted():
    """The op's handle adds N*C*Ho*Wo*K*K to what fvcore finds in the kernel generator."""
    layer = Involution(32, kernel_size=7, stride=1, group_channels=16).eval()
    x = torch.rand(1, 32, 10, 10)
    gen = FlopCountAnalysis(layer, x)
    gen.unsupported_ops_warnings(False)
    analyze.add_involution_flop_handles(gen)
    counted = gen.total()
    conv1 = 32 * 8 * 100  # 1x1, C -> C/4
    conv2 = 8 * 49 * 2 * 100  # 1x1, C/4 -> K*K*G
    assert counted >= conv1 + conv2 + 32 * 100 * 49


def test_analyze_config_small_input():
    config = str(REPO / "configs" / "Shapes" / "faster_rcnn_rednet26_involution_fpn.yaml")
    row = analyze.analyze_config(config, input_size=(96, 96))
    parts = row["params_parts"]
    assert row["params"] == parts["backbone"] + parts["neck"] + parts["heads"]
    assert parts["backbone"] > parts["neck"] > 0
    assert row["flops"] >= sum(row["flops_parts"].values()) > 0
    assert row["activations"] > 0
    table = analyze.config_table([row])
    assert "faster_rcnn_rednet26_involution_fpn.yaml | 96x96 |" in table


def test_main_rejects_bad_arguments():
    with pytest.raises(ValueError, match="--config-file"):
        analyze.main([])
    with pytest.raises(ValueError, match="--depths"):
        analyze.main(["--backbone-only", "--depths", "34"])
