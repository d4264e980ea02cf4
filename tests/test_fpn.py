"""Conv and involution FPNs on RedNet: official neck sizes and tensors, builders, P6/P7, errors."""

import d2_involution  # noqa: F401  (first: detectron2 compat + registrations)

# isort: split
import json
import re
from pathlib import Path

import official_reference  # tests/ is on sys.path under pytest
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone

from d2_involution import add_involution_config
from d2_involution.layers import Involution
from d2_involution.modeling import FPN, LastLevelP6P7, build_rednet, involution_output_block

REFERENCE = Path(official_reference.KEYS_JSON or "official_rednet_keys.json")

ALL_STAGES = ["res2", "res3", "res4", "res5"]


def make_cfg(name: str, depth: int = 26, in_features=ALL_STAGES):
    cfg = get_cfg()
    add_involution_config(cfg)
    cfg.MODEL.BACKBONE.NAME = name
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.REDNET.DEPTH = depth
    cfg.MODEL.REDNET.NORM = "BN"
    cfg.MODEL.REDNET.OUT_FEATURES = list(ALL_STAGES)
    cfg.MODEL.FPN.IN_FEATURES = list(in_features)
    return cfg


def neck_params(backbone) -> int:
    return sum(p.numel() for n, p in backbone.named_parameters() if not n.startswith("bottom_up."))


@pytest.fixture(scope="module")
def reference():
    if not REFERENCE.exists():
        pytest.skip(f"official key reference not found at {REFERENCE}")
    return json.loads(REFERENCE.read_text())


def test_rcnn_neck_parameter_counts_match_official(reference):
    conv = build_backbone(make_cfg("build_rednet_fpn_backbone", depth=50))
    inv = build_backbone(make_cfg("build_rednet_involution_fpn_backbone", depth=50))
    assert neck_params(conv) == 3_344_384
    assert neck_params(inv) == reference["mmdet_rednet50_involution_fpn"]["neck_params"]
    assert neck_params(inv) == 1_253_952


def test_involution_neck_tensors_match_official(reference):
    """The documented renaming maps every official neck tensor onto ours, shapes equal."""
    inv = build_backbone(make_cfg("build_rednet_involution_fpn_backbone", depth=50))
    ours = {
        k: tuple(v.shape) for k, v in inv.state_dict().items() if not k.startswith("bottom_up.")
    }
    mapped = {}
    for key, shape in reference["mmdet_rednet50_involution_fpn"]["keys"].items():
        m = re.match(r"neck\.lateral_convs\.(\d)\.conv\.(.*)", key)
        if m:
            mapped[f"fpn_lateral{int(m.group(1)) + 2}.{m.group(2)}"] = tuple(shape)
        m = re.match(r"neck\.fpn_convs\.(\d)\.(.*)", key)
        if m:
            mapped[f"fpn_output{int(m.group(1)) + 2}.{m.group(2)}"] = tuple(shape)
    assert mapped == ours
    assert all(isinstance(inv.get_submodule(f"fpn_output{s}"), Involution) for s in (2, 3, 4, 5))


@pytest.mark.parametrize(
    "name, in_features, levels",
    [
        ("build_rednet_fpn_backbone", ALL_STAGES, [2, 3, 4, 5, 6]),
        ("build_rednet_involution_fpn_backbone", ALL_STAGES, [2, 3, 4, 5, 6]),
        ("build_retinanet_rednet_fpn_backbone", ALL_STAGES[1:], [3, 4, 5, 6, 7]),
        ("build_retinanet_rednet_involution_fpn_backbone", ALL_STAGES[1:], [3, 4, 5, 6, 7]),
    ],
)
def test_builders_from_config_forward_odd_input(name, in_features, levels):
    cfg = make_cfg(name, in_features=in_features)
    backbone = build_backbone(cfg).eval()
    shapes = backbone.output_shape()
    assert list(shapes) == [f"p{s}" for s in levels]
    assert all(v.channels == 256 and v.stride == 2**s for s, v in zip(levels, shapes.values()))
    assert backbone.size_divisibility == 32
    h, w = 35, 41
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, h, w))
    for s in levels:
        size = (h, w)
        for _ in range(s):
            size = tuple(-(-x // 2) for x in size)
        assert out[f"p{s}"].shape == (1, 256) + size, s
    if "retinanet" in name:
        assert backbone.top_block.p6.in_channels == 2048
        assert not any(n.startswith("fpn_lateral2") for n, _ in backbone.named_parameters())


def test_p6p7_relu_switch():
    c5 = torch.randn(1, 8, 9, 9)
    block = LastLevelP6P7(8, 4, relu_before_p7=False)
    p6, p7 = block(c5)
    torch.testing.assert_close(p7, block.p7(p6))
    block.relu_before_p7 = True
    p6, p7 = block(c5)
    torch.testing.assert_close(p7, block.p7(torch.relu(p6)))
    assert not torch.allclose(block.p7(p6), p7)


def test_fpn_trains_end_to_end():
    """Gradients reach the involution output blocks and the bottom-up RedNet."""
    backbone = build_backbone(make_cfg("build_rednet_involution_fpn_backbone")).train()
    out = backbone(torch.randn(2, 3, 32, 32))
    sum(v.square().mean() for v in out.values()).backward()
    assert backbone.fpn_output3.conv2.conv.weight.grad.abs().sum() > 0
    assert backbone.bottom_up.stem.conv1.conv.weight.grad.abs().sum() > 0


def test_fpn_rejects_dilated_res5_and_unknown_features():
    bottom_up = build_rednet(26, res5_dilation=2, out_features=ALL_STAGES)
    with pytest.raises(ValueError, match="double"):
        FPN(bottom_up, ALL_STAGES, 256)
    bottom_up = build_rednet(26, out_features=["res3", "res4"])
    with pytest.raises(ValueError, match="in_features"):
        FPN(bottom_up, ["res3", "res4", "res5"], 256, output_block=involution_output_block())
    cfg = make_cfg("build_retinanet_rednet_fpn_backbone", in_features=["res3", "res4"])
    cfg.MODEL.REDNET.OUT_FEATURES = ["res3", "res4"]
    with pytest.raises(ValueError, match="res5"):
        build_backbone(cfg)
    with pytest.raises(ValueError, match="fuse_type"):
        FPN(build_rednet(26, out_features=["res5"]), ["res5"], 256, fuse_type="max")
