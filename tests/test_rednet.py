"""RedNet backbone: Detectron2's ResNet, official parameter counts and tensor names, freezing,
norms, dilation."""

import d2_involution  # noqa: F401  (first: detectron2 compat + registrations)

# isort: split
import json
import re
from collections import Counter
from pathlib import Path

import official_reference  # tests/ is on sys.path under pytest
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import ResNet, build_backbone
from torch import nn

from d2_involution import add_involution_config
from d2_involution.layers import FrozenStatsBatchNorm2d, Involution
from d2_involution.modeling import REDNET_DEPTHS, RedNetBlock, RedNetStem, build_rednet

REFERENCE = Path(official_reference.KEYS_JSON or "official_rednet_keys.json")

OFFICIAL_PARAMS_WITH_FC = {
    26: 9_233_166,
    38: 12_386_986,
    50: 15_540_806,
    101: 25_652_950,
    152: 33_984_582,
}
FC_PARAMS = 2048 * 1000 + 1000

_STEM_RENAMES = {"0": "conv1", "1": "involution", "2": "bn", "4": "conv2"}


def official_to_ours(key: str) -> str:
    """The renaming documented in d2_involution/modeling/rednet.py (``backbone.`` removed)."""
    key = key[len("backbone.") :]
    m = re.match(r"stem\.(\d)\.(.*)", key)
    if m:
        return f"stem.{_STEM_RENAMES[m.group(1)]}.{m.group(2)}"
    m = re.match(r"layer(\d)\.(.*)", key)
    assert m, key
    return f"res{int(m.group(1)) + 1}.{m.group(2)}"


@pytest.fixture(scope="module")
def reference():
    if not REFERENCE.exists():
        pytest.skip(f"official key reference not found at {REFERENCE}")
    return json.loads(REFERENCE.read_text())


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_cfg(**rednet):
    cfg = get_cfg()
    add_involution_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_rednet_backbone"
    for key, value in rednet.items():
        setattr(cfg.MODEL.REDNET, key, value)
    return cfg


@pytest.mark.parametrize("depth", sorted(REDNET_DEPTHS))
def test_classifier_parameter_count_and_tensors_match_official(depth, reference):
    """ImageNet RedNet (stem kernel 3) + a 1000-class fc has the official count and tensors."""
    model = build_rednet(depth, stem_involution_kernel=3, out_features=["res5"])
    assert n_params(model) + FC_PARAMS == OFFICIAL_PARAMS_WITH_FC[depth]
    assert reference[f"mmcls_rednet{depth}"]["params"] == OFFICIAL_PARAMS_WITH_FC[depth]

    official = {
        k: tuple(v)
        for k, v in reference[f"mmcls_rednet{depth}"]["keys"].items()
        if k.startswith("backbone.")
    }
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(ours) == len(official)
    assert Counter(ours.values()) == Counter(official.values())
    assert {official_to_ours(k): s for k, s in official.items()} == ours


def test_detection_backbone_matches_official(reference):
    """Detection RedNet-50 (stem kernel 7) = the official detector's backbone, tensor by tensor."""
    entry = reference["mmdet_rednet50_involution_fpn"]
    model = build_rednet(50, out_features=["res2", "res3", "res4", "res5"])
    assert n_params(model) == entry["backbone_params"] == 13_492_526
    official = {k: tuple(v) for k, v in entry["keys"].items() if k.startswith("backbone.")}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {official_to_ours(k): s for k, s in official.items()} == ours
    assert model.stem.involution.conv2.conv.out_channels == 7 * 7 * 2


def test_output_shape_and_odd_sized_forward():
    model = build_rednet(26, out_features=["stem", "res2", "res3", "res4", "res5"]).eval()
    shapes = model.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "stem": (64, 4),
        "res2": (256, 4),
        "res3": (512, 8),
        "res4": (1024, 16),
        "res5": (2048, 32),
    }
    assert model.size_divisibility == 0
    h, w = 45, 59
    with torch.no_grad():
        out = model(torch.randn(1, 3, h, w))
    for name, spec in shapes.items():
        expected = (-(-h // spec.stride), -(-w // spec.stride))  # ceil: odd sizes round up
        assert out[name].shape == (1, spec.channels) + expected, name


def test_rednet_is_detectron2_resnet_with_rednet_stem_and_blocks():
    model = build_rednet(26, out_features=["res2", "res5"])
    assert isinstance(model, ResNet) and isinstance(model.stem, RedNetStem)
    assert all(isinstance(b, RedNetBlock) for stage in model.stages for b in stage)
    assert list(model.stage_names) == ["res2", "res3", "res4", "res5"]


def test_stages_beyond_the_deepest_output_are_not_built():
    model = build_rednet(26, out_features=["res3"])
    assert list(model.stage_names) == ["res2", "res3"]
    assert not hasattr(model, "res4")


def test_block_structure_stride_on_involution_and_projection_shortcut():
    model = build_rednet(26, out_features=["res5"])
    first = model.res2[0]
    assert isinstance(first, RedNetBlock) and first.stride == 1
    assert first.downsample is not None  # 64 -> 256 projection at stride 1, as the official res2
    assert first.downsample[0].stride == (1, 1)
    res3 = model.res3[0]
    assert isinstance(res3.conv2, Involution) and res3.conv2.stride == 2
    assert res3.conv1.stride == (1, 1) and res3.downsample[0].stride == (2, 2)
    assert model.res3[1].downsample is None
    assert isinstance(model.stem.maxpool, nn.MaxPool2d) and model.stem.maxpool.padding == 1


def test_zero_init_residual():
    model = build_rednet(26, zero_init_residual=True)
    blocks = [b for b in model.modules() if isinstance(b, RedNetBlock)]
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)
    assert all(torch.all(b.bn2.weight == 1) for b in blocks)
    model = build_rednet(26, zero_init_residual=False)
    assert all(torch.all(b.bn3.weight == 1) for b in model.modules() if isinstance(b, RedNetBlock))


def _norms(module: nn.Module):
    return [m for m in module.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("norm", ["FrozenStatsBN", "BN"])
def test_freeze_at_freezes_exactly_stem_and_stages(freeze_at, norm):
    cfg = make_cfg(DEPTH=26, NORM=norm, OUT_FEATURES=["res2", "res3", "res4", "res5"])
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    model = build_backbone(cfg, ShapeSpec(channels=3))
    parts = [("stem", 1), ("res2", 2), ("res3", 3), ("res4", 4), ("res5", 5)]
    for name, level in parts:
        part = getattr(model, name)
        frozen = freeze_at >= level
        assert all(p.requires_grad != frozen for p in part.parameters()), name
        norms = _norms(part)
        assert norms, name
        assert all(isinstance(n, FrozenBatchNorm2d) == frozen for n in norms), name
        if not frozen and norm == "FrozenStatsBN":
            assert all(isinstance(n, FrozenStatsBatchNorm2d) for n in norms), name
    # A frozen stem normalises with fixed statistics even while the model is in train mode.
    x = torch.randn(2, 3, 16, 16)
    model.train()
    with torch.no_grad():
        train_out = model.stem(x)
    model.eval()
    with torch.no_grad():
        eval_out = model.stem(x)
    if freeze_at >= 1 or norm == "FrozenStatsBN":
        torch.testing.assert_close(train_out, eval_out)
    else:
        assert not torch.allclose(train_out, eval_out)


def test_freeze_converts_syncbn():
    model = build_rednet(26, norm="SyncBN", freeze_at=2)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.res3.modules())
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.stem.modules())
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.res2.modules())


def test_frozen_stats_bn_keeps_running_stats_and_trains_affine():
    """Two SGD steps leave every FrozenStatsBN's (non-trivial) statistics as they are, move every
    one's affine weights, and train mode normalises as eval mode does (seeded, finite: lr 0.01)."""
    torch.manual_seed(0)
    model = build_rednet(
        26, norm="FrozenStatsBN", out_features=["res3"], zero_init_residual=False
    ).train()
    norms = [m for m in model.modules() if isinstance(m, FrozenStatsBatchNorm2d)]
    assert norms
    for n in norms:  # non-trivial statistics, as in a pre-trained checkpoint
        n.running_mean.uniform_(-0.1, 0.1)
        n.running_var.uniform_(0.5, 2.0)
    stats = [(n.running_mean.clone(), n.running_var.clone()) for n in norms]
    weights = [(n.weight.detach().clone(), n.bias.detach().clone()) for n in norms]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        opt.zero_grad()
        loss = model(x)["res3"].square().mean()
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    for n, (mean, var) in zip(norms, stats):
        assert torch.equal(n.running_mean, mean) and torch.equal(n.running_var, var)
    moved = [
        not (torch.equal(n.weight, w) and torch.equal(n.bias, b))
        for n, (w, b) in zip(norms, weights)
    ]
    assert all(moved)
    # Train and eval mode normalise identically (running statistics in both).
    model.eval()
    with torch.no_grad():
        eval_out = model(x)["res3"]
    model.train()
    with torch.no_grad():
        train_out = model(x)["res3"]
    assert torch.isfinite(eval_out).all()
    torch.testing.assert_close(train_out, eval_out)
    # ... and the statistics they normalise with are the running ones, not the batch's.
    n = norms[0]
    probe = torch.randn(4, n.num_features, 3, 3)
    scale = n.weight / torch.sqrt(n.running_var + n.eps)
    expected = (probe - n.running_mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)
    torch.testing.assert_close(n(probe), expected + n.bias.view(1, -1, 1, 1))


def test_bn_mode_does_update_running_stats():
    """Control for the test above: plain BN in train mode moves its statistics."""
    model = build_rednet(26, norm="BN", out_features=["res2"]).train()
    bn = model.stem.conv1.bn
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert not torch.equal(bn.running_mean, before)


def test_res5_dilation_keeps_stride_16():
    model = build_rednet(26, res5_dilation=2, out_features=["res4", "res5"]).eval()
    assert model.output_shape()["res5"].stride == 16
    assert model.res5[0].conv2.stride == 1 and model.res5[0].conv2.dilation == 2
    with torch.no_grad():
        out = model(torch.randn(1, 3, 50, 66))
    assert out["res5"].shape[-2:] == out["res4"].shape[-2:] == (4, 5)
    assert out["res5"].shape[1] == 2048


def test_build_rednet_backbone_from_config_odd_input():
    cfg = make_cfg(DEPTH=38, NORM="BN", OUT_FEATURES=["res3", "res5"], RES5_DILATION=1)
    cfg.MODEL.INVOLUTION.GROUP_CHANNELS = 8
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    model = build_backbone(cfg).eval()
    assert isinstance(model, ResNet) and isinstance(model.stem, RedNetStem)
    assert [len(s) for s in model.stages] == [2, 3, 5, 2]
    assert model.res3[0].conv2.groups == 128 // 8
    with torch.no_grad():
        out = model(torch.randn(2, 3, 33, 41))
    assert set(out) == {"res3", "res5"}
    assert out["res3"].shape == (2, 512, 5, 6) and out["res5"].shape == (2, 2048, 2, 2)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"DEPTH": 42}, "depth"),
        ({"NORM": "NoSuchNorm"}, "norm"),
        ({"NORM": "GN"}, "GN"),
        ({"OUT_FEATURES": ["res6"]}, "out_features"),
        ({"OUT_FEATURES": []}, "out_features"),
        ({"RES5_DILATION": 4}, "res5_dilation"),
    ],
)
def test_bad_config_raises_clear_error(override, message):
    cfg = make_cfg(**override)
    with pytest.raises(ValueError, match=message):
        build_backbone(cfg)


def test_bad_freeze_at_raises():
    cfg = make_cfg()
    cfg.MODEL.BACKBONE.FREEZE_AT = 7
    with pytest.raises(ValueError, match="freeze_at"):
        build_backbone(cfg)


def test_frozen_bn_norm_builds_without_trainable_norms():
    model = build_rednet(26, norm="FrozenBN", out_features=["res3"]).train()
    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert norms and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    n_norm_params = sum(p.numel() for n, p in model.named_parameters() if ".bn" in n)
    assert n_norm_params == 0
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model(x)["res3"], model.eval()(x)["res3"])


@pytest.mark.cuda
def test_rednet_fpn_cuda_matches_cpu():
    from detectron2.modeling.backbone import FPN

    from d2_involution.modeling import use_involution_outputs

    torch.manual_seed(0)
    bottom_up = build_rednet(26, out_features=["res2", "res3", "res4", "res5"])
    model = use_involution_outputs(FPN(bottom_up, ["res2", "res3", "res4", "res5"], 256))
    model.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        cpu = model(x)
        gpu = model.cuda()(x.cuda())
    for name, value in cpu.items():
        torch.testing.assert_close(gpu[name].cpu(), value, rtol=1e-3, atol=1e-3)
