"""Conv and involution FPNs on RedNet: Detectron2's FPN, official neck sizes and tensors, builders,
P6/P7, errors."""

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
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.structures import ImageList

from d2_involution import add_involution_config
from d2_involution.layers import Involution
from d2_involution.modeling import LastLevelP6P7WithoutReLU, build_rednet, use_involution_outputs

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
def test_builders_return_detectron2_fpn_on_padded_odd_input(name, in_features, levels):
    cfg = make_cfg(name, in_features=in_features)
    backbone = build_backbone(cfg).eval()
    assert isinstance(backbone, FPN)
    shapes = backbone.output_shape()
    assert list(shapes) == [f"p{s}" for s in levels]
    assert all(v.channels == 256 and v.stride == 2**s for s, v in zip(levels, shapes.values()))
    assert backbone.size_divisibility == 32
    # An odd-sized image, padded to size_divisibility as Detectron2's meta-architectures do.
    image = ImageList.from_tensors([torch.randn(3, 35, 41)], backbone.size_divisibility)
    assert image.tensor.shape[-2:] == (64, 64)
    with torch.no_grad():
        out = backbone(image.tensor)
    for s in levels:
        size = -(-64 // 2**s)  # P6/P7 of a 64 px input: ceil
        assert out[f"p{s}"].shape == (1, 256, size, size), s
    # The output blocks FPN.forward calls (top-down order) are the named ones, swapped or not.
    outputs = [backbone.get_submodule(f"fpn_output{s}") for s in levels[: len(in_features)]]
    assert backbone.output_convs == outputs[::-1]
    assert all(isinstance(m, Involution) == ("involution" in name) for m in outputs)
    if "retinanet" in name:
        assert type(backbone.top_block) is LastLevelP6P7WithoutReLU
        assert backbone.top_block.p6.in_channels == 2048
        assert not any(n.startswith("fpn_lateral2") for n, _ in backbone.named_parameters())


def test_involution_outputs_keep_detectron2_fpn_forward():
    """A swapped FPN computes Detectron2's FPN with each output conv replaced: the same laterals
    and top-down sums, the involution applied where the conv was."""
    torch.manual_seed(0)
    bottom_up = build_rednet(26, out_features=ALL_STAGES).eval()
    conv_fpn = FPN(bottom_up, ALL_STAGES, 64).eval()
    inv_fpn = FPN(bottom_up, ALL_STAGES, 64)
    inv_fpn.load_state_dict(conv_fpn.state_dict())
    use_involution_outputs(inv_fpn, group_channels=16).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = bottom_up(x)
        prev = conv_fpn.fpn_lateral5(feats["res5"])
        expected = {"p5": inv_fpn.fpn_output5(prev)}
        for s in (4, 3, 2):
            lateral = conv_fpn.get_submodule(f"fpn_lateral{s}")(feats[f"res{s}"])
            prev = lateral + prev.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
            expected[f"p{s}"] = inv_fpn.get_submodule(f"fpn_output{s}")(prev)
        out = inv_fpn(x)
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value)
    assert inv_fpn.fpn_output2.conv2.conv.out_channels == 7 * 7 * 64 // 16


def test_p6p7_with_and_without_relu():
    """The official neck: P7 = conv(P6); Detectron2's (MODEL.FPN.RELU_BEFORE_P7): conv(relu(P6))."""
    c5 = torch.randn(1, 8, 9, 9)
    block = LastLevelP6P7WithoutReLU(8, 4)
    p6, p7 = block(c5)
    torch.testing.assert_close(p7, block.p7(p6))
    assert not torch.allclose(block.p7(torch.relu(p6)), p7)
    detectron2_block = LastLevelP6P7(8, 4)
    detectron2_block.load_state_dict(block.state_dict())
    torch.testing.assert_close(detectron2_block(c5)[1], block.p7(torch.relu(p6)))
    cfg = make_cfg("build_retinanet_rednet_fpn_backbone", in_features=ALL_STAGES[1:])
    cfg.MODEL.FPN.RELU_BEFORE_P7 = True
    assert type(build_backbone(cfg).top_block) is LastLevelP6P7


def test_fpn_trains_end_to_end():
    """Gradients reach the involution output blocks and the bottom-up RedNet."""
    backbone = build_backbone(make_cfg("build_rednet_involution_fpn_backbone")).train()
    out = backbone(torch.randn(2, 3, 32, 32))
    sum(v.square().mean() for v in out.values()).backward()
    assert backbone.fpn_output3.conv2.conv.weight.grad.abs().sum() > 0
    assert backbone.bottom_up.stem.conv1.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("build_rednet_fpn_backbone", {"REDNET.RES5_DILATION": 2}, "double"),
        (
            "build_rednet_involution_fpn_backbone",
            {"REDNET.OUT_FEATURES": ["res3", "res4"]},
            "IN_FEATURES",
        ),
        ("build_rednet_fpn_backbone", {"FPN.FUSE_TYPE": "max"}, "FUSE_TYPE"),
        (
            "build_retinanet_rednet_fpn_backbone",
            {"REDNET.OUT_FEATURES": ["res3", "res4"], "FPN.IN_FEATURES": ["res3", "res4"]},
            "res5",
        ),
    ],
)
def test_fpn_builders_reject_bad_config(name, overrides, message):
    cfg = make_cfg(name)
    for key, value in overrides.items():
        node, leaf = key.split(".")
        setattr(getattr(cfg.MODEL, node), leaf, value)
    with pytest.raises(ValueError, match=message):
        build_backbone(cfg)
