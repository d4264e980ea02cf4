"""LazyConfig ``.py`` configs build the same models as their YAML twins, and train + evaluate.

For each pair: the same module tree (names, shapes, frozen parameters, the printed modules), the
same settings held outside parameters (matchers, box transforms, loss and test parameters, pixel
mean/std, anchors). The Shapes pairs, with the YAML model's weights (random norm statistics, so
every block matters) loaded into the LazyConfig model, also give the same predictions on a random
image and the same training losses on it. Shapes LazyConfigs train 2 iterations through
tools/lazyconfig_train_net.py and are evaluated; ``--eval-only`` on the final checkpoint
reproduces that evaluation. The COCO and Cityscapes pairs also have the same solver (one optimizer
step, the LR multiplier over the schedule); the Shapes solvers are not compared, their YAML values
are still being tuned.
"""

import inspect
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from omegaconf import DictConfig, ListConfig
from random_weights import randomize_norms

from d2_involution import add_involution_config
from d2_involution.solver import build_lr_scheduler, build_optimizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import lazyconfig_train_net  # noqa: E402

CONFIGS = REPO / "configs"
pytestmark = pytest.mark.usefixtures("one_torch_thread")
# RedNet-50 models, next to their YAML twins: building them is cheap, running them is not.
FULL_SIZE = [
    "COCO-Detection/faster_rcnn_rednet50_fpn_1x",
    "COCO-Detection/faster_rcnn_rednet50_involution_fpn_1x",
    "COCO-Detection/retinanet_rednet50_fpn_1x",
    "COCO-Detection/retinanet_rednet50_involution_fpn_1x",
    "COCO-InstanceSegmentation/mask_rcnn_rednet50_fpn_1x",
    "COCO-InstanceSegmentation/mask_rcnn_rednet50_involution_fpn_1x",
    "Cityscapes/semantic_fpn_rednet50_512x1024_80k",
    "Cityscapes/semantic_fpn_rednet50_involution_fpn_512x1024_80k",
    "Cityscapes/upernet_rednet50_512x1024_80k",
]
SHAPES_PAIRS = [
    (f"Shapes-LazyConfig/{name}", f"Shapes/{name}")
    for name in (
        "faster_rcnn_rednet26_fpn",
        "mask_rcnn_rednet26_fpn",
        "retinanet_rednet26_fpn",
        "retinanet_rednet26_involution_fpn",
        "semantic_fpn_rednet26_fpn",
        "semantic_fpn_rednet26_involution_fpn",
        "upernet_rednet26",
    )
]
SHAPES = str(CONFIGS / "Shapes-LazyConfig" / "faster_rcnn_rednet26_fpn.py")
SHAPES_SEM_SEG = str(CONFIGS / "Shapes-LazyConfig" / "upernet_rednet26.py")
# What every nn.Module holds (parameters, hooks, the training flag): compared otherwise or not.
_MODULE_INTERNALS = set(vars(torch.nn.Module()))


def _yaml_cfg(name: str):
    cfg = add_involution_config(get_cfg())
    cfg.merge_from_file(str(CONFIGS / f"{name}.yaml"))
    return cfg


def _yaml_model(name: str) -> torch.nn.Module:
    cfg = _yaml_cfg(name)
    cfg.MODEL.DEVICE = "cpu"
    return randomize_norms(build_model(cfg)).eval()


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as lists, dicts and scalars: sequences (OmegaConf's too) as lists, other objects
    (matchers, box transforms) as their type and attributes; tensors and modules by type only."""
    if isinstance(value, (torch.Tensor, torch.nn.Module)):
        return type(value).__name__
    if isinstance(value, (list, tuple, ListConfig)):
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, (dict, DictConfig)):
        return {k: _plain(v, depth + 1) for k, v in value.items()}
    if inspect.isroutine(value) or isinstance(value, type) or not hasattr(value, "__dict__"):
        return value
    if depth > 3:
        return type(value).__name__
    return {"type": type(value).__name__, **_plain(vars(value), depth + 1)}


def _settings(model: torch.nn.Module) -> Dict[str, Dict[str, Any]]:
    """The non-parameter attributes of every module, by module name."""
    settings = {}
    for name, module in model.named_modules():
        attributes = {k: _plain(v) for k, v in vars(module).items() if k not in _MODULE_INTERNALS}
        # FastRCNNOutputLayers: the YAML gives {"loss_box_reg": w}, a missing loss weighs 1.0.
        if isinstance(attributes.get("loss_weight"), dict):
            attributes["loss_weight"] = {"loss_cls": 1.0, "loss_box_reg": 1.0}
            attributes["loss_weight"].update(_plain(module.loss_weight))
        settings[name] = attributes
    return settings


def _same_model(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    want = {k: (p.shape, p.requires_grad) for k, p in reference.named_parameters()}
    assert {k: (p.shape, p.requires_grad) for k, p in model.named_parameters()} == want
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert str(model) == str(reference)
    assert _settings(model) == _settings(reference)
    # Buffers outside the state dict (pixel mean/std, cell anchors) come from the config only.
    buffers = dict(model.named_buffers())
    for name, buffer in reference.named_buffers():
        if name not in reference.state_dict():
            torch.testing.assert_close(buffers[name], buffer, rtol=0, atol=0, msg=name)


def _input(image: torch.Tensor, training: bool) -> dict:
    """One image and, for training, two boxes with masks and a label map with ignored pixels."""
    if not training:
        return {"image": image, "height": 70, "width": 90}
    h, w = image.shape[-2:]
    instances = Instances((h, w), gt_classes=torch.tensor([1, 3]))
    instances.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 40.0, 44.0], [50.0, 20.0, 90.0, 60.0]]))
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 12:44, 10:40] = masks[1, 20:60, 50:90] = True
    instances.gt_masks = BitMasks(masks)
    sem_seg = torch.zeros(h, w, dtype=torch.long)
    sem_seg[masks[0]], sem_seg[masks[1]], sem_seg[:4] = 2, 4, 255
    return {"image": image, "instances": instances, "sem_seg": sem_seg}


def _predictions(model: torch.nn.Module, image: torch.Tensor) -> Dict[str, torch.Tensor]:
    with torch.no_grad():
        output = model([_input(image, training=False)])[0]
    if "sem_seg" in output:
        return {"sem_seg": output["sem_seg"]}
    fields = output["instances"].get_fields()
    assert len(fields["pred_boxes"]) > 0
    return {k: v.tensor if k == "pred_boxes" else v for k, v in fields.items()}


def _training_losses(model: torch.nn.Module, image: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Losses on ``image`` and its mirror image (two: UPerNet's 1x1 pooling has a BN)."""
    model.train()
    torch.manual_seed(0)  # the same proposal/anchor sampling and dropout in both models
    with torch.no_grad(), EventStorage():
        losses = model([_input(image, training=True), _input(image.flip(-1), training=True)])
    model.eval()
    return losses


@pytest.mark.parametrize("name", FULL_SIZE)
def test_lazyconfig_builds_the_yaml_model(name):
    model = instantiate(LazyConfig.load(str(CONFIGS / f"{name}.py")).model)
    _same_model(model, _yaml_model(name))


@pytest.mark.parametrize("lazy,yaml", SHAPES_PAIRS)
def test_lazyconfig_shapes_model_predicts_and_trains_as_the_yaml_one(lazy, yaml):
    reference = _yaml_model(yaml)
    model = instantiate(LazyConfig.load(str(CONFIGS / f"{lazy}.py")).model).eval()
    _same_model(model, reference)
    model.load_state_dict(reference.state_dict())
    # Score threshold 0 in both detectors: every kept box is compared, not only the confident ones.
    for m in (model, reference):
        owner = m.roi_heads.box_predictor if hasattr(m, "roi_heads") else m
        if hasattr(owner, "test_score_thresh"):
            assert owner.test_score_thresh == 0.05
            owner.test_score_thresh = 0.0
    image = torch.randint(0, 256, (3, 64, 96), generator=torch.Generator().manual_seed(0)).float()
    got, expected = _predictions(model, image), _predictions(reference, image)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key)
    got, expected = _training_losses(model, image), _training_losses(reference, image)
    assert got.keys() == expected.keys() and all(v > 0 for v in expected.values())
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key)


def _step_once(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> List[torch.Tensor]:
    """Parameters after one step with gradients of norm ~110 (above any clipping threshold)."""
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", FULL_SIZE)
def test_lazyconfig_solver_is_the_yaml_one(name):
    """Optimizer (LR, momentum, weight decay per norm/other parameter, clipping) through one step
    on a small conv+BN, and the LR multiplier over the schedule."""
    cfg, yaml_cfg = LazyConfig.load(str(CONFIGS / f"{name}.py")), _yaml_cfg(name)
    models = [torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)) for _ in "ab"]
    models[1].load_state_dict(models[0].state_dict())
    cfg.optimizer.get("optimizer", cfg.optimizer).params.model = models[0]
    optimizer, reference = instantiate(cfg.optimizer), build_optimizer(yaml_cfg, models[1])
    assert type(optimizer).__name__ == type(reference).__name__
    for got, expected in zip(_step_once(optimizer, models[0]), _step_once(reference, models[1])):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    max_iter = yaml_cfg.SOLVER.MAX_ITER
    assert cfg.train.max_iter == max_iter
    multiplier = instantiate(cfg.lr_multiplier)
    expected = build_lr_scheduler(yaml_cfg, reference)._multiplier
    for it in sorted({0, 1, max_iter // 100, max_iter // 40, *yaml_cfg.SOLVER.STEPS, max_iter - 1}):
        assert multiplier(it / max_iter) == pytest.approx(expected(it / max_iter), rel=1e-12), it


def test_lazyconfig_overrides_reach_the_model():
    cfg = LazyConfig.load(SHAPES)
    cfg = LazyConfig.apply_overrides(cfg, ["model.roi_heads.num_classes=7", "train.max_iter=5"])
    model = instantiate(cfg.model)
    assert model.roi_heads.box_predictor.cls_score.out_features == 8 and cfg.train.max_iter == 5


@pytest.mark.parametrize(
    "config,task,metrics",
    [(SHAPES, "bbox", {"AP", "AP50"}), (SHAPES_SEM_SEG, "sem_seg", {"mIoU", "pACC"})],
    ids=["faster_rcnn", "upernet"],
)
def test_lazyconfig_trains_and_evaluates_on_shapes(tmp_path, monkeypatch, config, task, metrics):
    # A small generated copy of the shapes splits: 4 validation images keep the 2 evaluations cheap.
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setenv("D2INV_SHAPES_TRAIN_IMAGES", "8")
    monkeypatch.setenv("D2INV_SHAPES_VAL_IMAGES", "4")
    out = tmp_path / "output"
    # From scratch: the semantic configs' shapes-pretrained backbone is tested elsewhere.
    opts = [f"train.output_dir={out}", "train.max_iter=2", "train.log_period=1"]
    opts.append('train.init_checkpoint=""')
    results = lazyconfig_train_net.main(
        default_argument_parser().parse_args(["--config-file", config, *opts])
    )
    assert (out / "model_final.pth").is_file() and (out / "config.yaml").is_file()
    assert "total_loss" in (out / "metrics.json").read_text()
    assert set(results[task]) >= metrics
    argv = ["--config-file", config, "--eval-only", f"train.output_dir={out}"]
    argv.append(f"train.init_checkpoint={out / 'model_final.pth'}")
    again = lazyconfig_train_net.main(default_argument_parser().parse_args(argv))
    assert again[task] == pytest.approx(results[task], nan_ok=True)
