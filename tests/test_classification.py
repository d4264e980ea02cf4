"""The classification trainer end to end on CPU: train, resume, evaluate, skip bad images, export.

One small ImageNet-style folder (4 colour-coded classes of 40 px images, one corrupt file in each
split) is written per session; RedNet-26 trains on 32 px crops for 40 iterations (one thread, no
data-loading workers, fixed seed: deterministic), once uninterrupted and once resumed from the
iteration-20 checkpoint of that run.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from PIL import Image

import d2_involution
from d2_involution.checkpoint import export_backbone, load_backbone_weights
from d2_involution.classification import (
    ClassificationTrainer,
    RedNetClassifier,
    get_cls_cfg,
    scale_solver_to_actual_batch,
)
from d2_involution.classification.data import (
    ImageFolderClassification,
    ResumableTrainingSampler,
    ResumableTrainLoader,
    resolve_dataset_root,
)
from d2_involution.modeling import RedNetStem, build_rednet

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from train_cls import argument_parser, main  # noqa: E402

OFFICIAL_PARAMS = {26: 9233166, 38: 12386986, 50: 15540806, 101: 25652950, 152: 33984582}
NUM_CLASSES = 4
MAX_ITER = 40
STEM_GENERATOR = ["stem.involution.conv2.conv.bias", "stem.involution.conv2.conv.weight"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: deterministic reductions, and no spinning on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_folder(root: Path, n_train: int = 24, n_val: int = 8, size: int = 40) -> Path:
    """Class c: a noisy image of colour c with a random rectangle of a random colour on it."""
    rng = np.random.default_rng(0)
    colours = np.array([[220, 40, 40], [40, 200, 40], [40, 60, 220], [200, 200, 40]])
    for split, n in (("train", n_train), ("val", n_val)):
        for c, colour in enumerate(colours):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = colour + rng.normal(0, 30, (size, size, 3))
                y, x = rng.integers(0, size - 10, 2)
                h, w = rng.integers(6, 14, 2)
                img[y : y + h, x : x + w] = rng.integers(0, 256, 3)
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
        (root / split / "class_1" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (root / "train" / "class_0" / "notes.txt").write_text("not an image extension: ignored")
    return root


def _opts(data: Path, out: Path):
    return [
        "DATASETS.CLS.ROOT", str(data), "MODEL.REDNET.DEPTH", "26", "MODEL.DEVICE", "cpu",
        "INPUT.CLS.TRAIN_CROP_SIZE", "32", "INPUT.CLS.TRAIN_SCALE", "(0.25, 1.0)",
        "INPUT.CLS.TEST_RESIZE", "36", "INPUT.CLS.TEST_CROP_SIZE", "32",
        "SOLVER.IMS_PER_BATCH", "16", "SOLVER.BASE_LR", "0.02", "SOLVER.NESTEROV", "True",
        "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.WARMUP_ITERS", "5",
        "SOLVER.WARMUP_FACTOR", "0.25", "SOLVER.CHECKPOINT_PERIOD", "20",
        "TEST.EVAL_PERIOD", str(MAX_ITER), "TEST.CLS.IMS_PER_GPU", "16",
        "MODEL.CLS.LABEL_SMOOTHING", "0.1", "DATALOADER.NUM_WORKERS", "0", "SEED", "7",
        "OUTPUT_DIR", str(out),
    ]  # fmt: skip


def _run(argv):
    return main(argument_parser().parse_args(argv))


def _metrics(out: Path):
    with open(out / "metrics.json") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted run, then a run resumed from its iteration-20 checkpoint."""
    base = tmp_path_factory.mktemp("cls")
    data = _write_folder(base / "data")
    full = base / "full"
    full_results = _run(_opts(data, full))
    resumed = base / "resumed"
    resumed.mkdir()
    shutil.copy(full / "model_0000019.pth", resumed / "model_0000019.pth")
    (resumed / "last_checkpoint").write_text("model_0000019.pth")
    resumed_results = _run(["--resume"] + _opts(data, resumed))
    return dict(
        data=data,
        full=full,
        resumed=resumed,
        full_results=full_results,
        resumed_results=resumed_results,
    )


def imagenet_classifier(depth: int, num_classes: int) -> RedNetClassifier:
    """The official ImageNet RedNet layout: stem involution 3x3, GAP, fc."""
    return RedNetClassifier(build_rednet(depth, stem_involution_kernel=3), num_classes)


@pytest.mark.parametrize("depth", sorted(OFFICIAL_PARAMS))
def test_classifier_has_official_parameter_count(depth):
    model = imagenet_classifier(depth, 1000)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[depth]
    keys = model.state_dict().keys()
    assert all(k.startswith(("backbone.", "fc.")) for k in keys)
    assert model.fc.weight.shape == (1000, 2048)
    assert model.backbone.stem.involution.conv2.conv.weight.shape[0] == 9 * 2  # 3x3, G = 32/16


@pytest.mark.parametrize("norm", ["BN", "SyncBN"])
def test_classifier_forward_modes(norm):
    backbone = build_rednet(26, stem_involution_kernel=3, norm=norm)
    model = RedNetClassifier(backbone, 3, label_smoothing=0.1).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    logits = model({"image": images, "label": torch.tensor([0, 2])})
    assert logits.shape == (2, 3)
    normalised = (images.float() - model.pixel_mean) / model.pixel_std
    torch.testing.assert_close(model(normalised), logits)
    model.train()
    losses = model({"image": images, "label": torch.tensor([0, 2])})
    assert set(losses) == {"loss_cls"} and losses["loss_cls"].ndim == 0
    with pytest.raises(TypeError, match="batch dict"):
        model([images])
    with pytest.raises(ValueError, match="num_classes"):
        RedNetClassifier(backbone, 0)
    with pytest.raises(TypeError, match="Backbone"):
        RedNetClassifier(26, 3)


def test_classifier_from_config_is_a_detectron2_meta_architecture():
    cfg = get_cls_cfg()
    cfg.MODEL.REDNET.DEPTH = 26
    cfg.MODEL.CLS.NUM_CLASSES = 4
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert isinstance(model, RedNetClassifier) and isinstance(model.backbone.stem, RedNetStem)
    assert model.backbone.stem.involution.kernel_size == 3 and model.fc.out_features == 4
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[26] - 996 * 2049


def test_trainer_builds_the_optimizer_solver_optimizer_names():
    """SOLVER.OPTIMIZER reaches the classification trainer as it reaches train_net.py's."""
    cfg = get_cls_cfg()
    model = torch.nn.Linear(2, 2)
    assert type(ClassificationTrainer.build_optimizer(cfg, model)) is torch.optim.SGD
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    assert type(ClassificationTrainer.build_optimizer(cfg, model)) is torch.optim.AdamW


def test_batch_scaling_rule():
    cfg = get_cls_cfg()
    cfg.merge_from_file(str(REPO / "configs/ImageNet-Classification/rednet50.yaml"))
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.REFERENCE_WORLD_SIZE) == (2048, 64)
    same = scale_solver_to_actual_batch(cfg.clone(), 8, 1281167)
    assert same.SOLVER.IMS_PER_BATCH == 256 and same.SOLVER.BASE_LR == pytest.approx(0.1)
    assert same.SOLVER.WARMUP_ITERS == 3130 * 8
    assert same.SOLVER.MAX_ITER == -(-130 * 1281167 // 256)
    cfg.SOLVER.CLS.ACCUMULATION_STEPS = 8
    accumulated = scale_solver_to_actual_batch(cfg, 8, 1281167)
    assert accumulated.SOLVER.IMS_PER_BATCH == 2048
    assert accumulated.SOLVER.BASE_LR == pytest.approx(0.8)
    assert accumulated.SOLVER.WARMUP_ITERS == 3130
    assert accumulated.SOLVER.MAX_ITER == -(-130 * 1281167 // 2048)
    again = scale_solver_to_actual_batch(accumulated.clone(), 8, 1281167)
    assert again.SOLVER.BASE_LR == accumulated.SOLVER.BASE_LR
    bad = get_cls_cfg()
    bad.SOLVER.IMS_PER_BATCH = 10
    with pytest.raises(ValueError, match="divisible"):
        scale_solver_to_actual_batch(bad, 4, 100)


def test_sampler_is_resumable_and_sharded():
    full = ResumableTrainingSampler(10, seed=3)
    stream = [next(it) for it in [iter(full)] for _ in range(35)]
    assert sorted(i for i, _ in stream[:10]) == list(range(10))  # each epoch is a permutation
    assert [i for i, _ in stream[:10]] != [i for i, _ in stream[10:20]]
    later = iter(ResumableTrainingSampler(10, seed=3, start=13))
    assert [next(later) for _ in range(22)] == stream[13:]
    ranks = [iter(ResumableTrainingSampler(10, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    interleaved = [next(ranks[p % 2]) for p in range(20)]
    assert interleaved == stream[:20]


class _LinearLoss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, batch):
        return {"loss": ((self.linear(batch["x"]).squeeze(1) - batch["y"]) ** 2).mean()}


def test_accumulation_equals_one_step_on_the_whole_batch():
    from detectron2.engine import SimpleTrainer
    from detectron2.utils.events import EventStorage

    from d2_involution.classification import AccumulatingTrainer

    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8)
    halves = [{"x": x[:4], "y": y[:4]}, {"x": x[4:], "y": y[4:]}]
    models = [_LinearLoss(), _LinearLoss()]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    with EventStorage():
        AccumulatingTrainer(models[0], iter(halves), opts[0], accumulation_steps=2).run_step()
        SimpleTrainer(models[1], iter([{"x": x, "y": y}]), opts[1]).run_step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="accumulation_steps"):
        AccumulatingTrainer(models[0], halves, opts[0], accumulation_steps=0)


def test_dataset_skips_unreadable_images(tmp_path):
    data = _write_folder(tmp_path / "d", n_train=2, n_val=1)
    ds = ImageFolderClassification(str(data), "train", is_train=True, crop_size=16)
    assert len(ds) == 4 * 2 + 1 and ds.classes == [f"class_{c}" for c in range(4)]
    corrupt = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("corrupt.png")]
    assert len(corrupt) == 1 and ds[(corrupt[0], 0)] is None
    sample = ds[(0, 5)]
    assert sample["image"].shape == (3, 16, 16) and sample["image"].dtype == torch.uint8
    assert torch.equal(ds[(0, 5)]["image"], sample["image"])  # augmentation fixed by the seed
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderClassification(str(data), "test", is_train=False)

    # The batches do not depend on the number of loading workers; the corrupt file is counted.
    order = iter(ResumableTrainingSampler(len(ds), seed=1))
    expected_skips = sum(next(order)[0] == corrupt[0] for _ in range(20))
    assert expected_skips >= 2  # 20 samples cover two full epochs of 9
    batches = []
    for workers in (0, 2):
        loader = ResumableTrainLoader(ds, 4, seed=1, num_workers=workers)
        stream = iter(loader)
        batches.append([next(stream) for _ in range(5)])
        assert loader.num_skipped == expected_skips
    for a, b in zip(*batches):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    with pytest.raises(ValueError, match="DATASETS.CLS.ROOT"):
        resolve_dataset_root(str(tmp_path / "missing"))


def test_training_beats_chance_and_counts_unreadable_images(runs):
    results = runs["full_results"]["classification"]
    # 4 classes: chance is 25%. Measured 100% (32/32) on this folder.
    assert results["top1"] >= 75.0
    assert results["num_images"] == 4 * 8 and results["skipped_images"] == 1
    metrics = _metrics(runs["full"])
    assert max(m.get("skipped_images", 0) for m in metrics) >= 1
    log = (runs["full"] / "log.txt").read_text()
    assert "Skipping unreadable image" in log and "corrupt.png" in log
    # Warm-up from 0.25x, cosine to 0: LR below the base at 19, near 0 at the last iteration.
    lrs = {m["iteration"]: m["lr"] for m in metrics if "lr" in m}
    assert max(lrs) == MAX_ITER - 1
    assert lrs[19] < 0.02 and lrs[MAX_ITER - 1] < 1e-4
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses[-1] < losses[0]


def test_resume_continues_schedule_and_ends_at_same_weights(runs):
    log = (runs["resumed"] / "log.txt").read_text()
    assert "Starting training from iteration 20" in log
    full_lrs = {m["iteration"]: m["lr"] for m in _metrics(runs["full"]) if "lr" in m}
    resumed_lrs = {m["iteration"]: m["lr"] for m in _metrics(runs["resumed"]) if "lr" in m}
    assert set(resumed_lrs) and set(resumed_lrs) <= set(full_lrs)
    for it, lr in resumed_lrs.items():
        assert it >= 20 and lr == pytest.approx(full_lrs[it], rel=1e-12)
    full = torch.load(runs["full"] / "model_final.pth", weights_only=False)
    resumed = torch.load(runs["resumed"] / "model_final.pth", weights_only=False)
    assert full["iteration"] == resumed["iteration"] == MAX_ITER - 1
    assert full["model"].keys() == resumed["model"].keys()
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert runs["resumed_results"] == runs["full_results"]


def test_eval_only_reproduces_final_accuracy(runs, tmp_path):
    weights = runs["full"] / "model_final.pth"
    opts = _opts(runs["data"], tmp_path / "eval") + ["MODEL.WEIGHTS", str(weights)]
    results = _run(["--eval-only"] + opts)
    assert results == runs["full_results"]


def test_tool_entry_point_evaluates(runs, tmp_path):
    """tools/train_cls.py (argument parsing + launch) in a fresh process."""
    weights = runs["full"] / "model_final.pth"
    argv = (
        ["--eval-only"] + _opts(runs["data"], tmp_path / "tool") + ["MODEL.WEIGHTS", str(weights)]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train_cls.py")] + argv,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    top1 = runs["full_results"]["classification"]["top1"]
    assert f"copypaste: {top1:.4f}," in proc.stdout


def _faster_rcnn(depth: int = 26):
    cfg = get_cfg()
    d2_involution.add_involution_config(cfg)
    base = REPO / "configs" / "Base-RCNN-FPN-RedNet.yaml"
    if base.exists():
        cfg.merge_from_file(str(base))
    else:
        cfg.MODEL.BACKBONE.NAME = "build_rednet_fpn_backbone"
        cfg.MODEL.REDNET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.REDNET.DEPTH = depth
    cfg.MODEL.REDNET.STEM_INVOLUTION_KERNEL = 7
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg)


@pytest.mark.parametrize("prefix", ["", "backbone.bottom_up."])
def test_exported_backbone_loads_into_faster_rcnn(runs, tmp_path, prefix):
    weights = runs["full"] / "model_final.pth"
    out = tmp_path / "rednet26_d2.pth"
    argv = ["--export-backbone", str(out), "--export-prefix", prefix]
    argv += _opts(runs["data"], tmp_path / "export") + ["MODEL.WEIGHTS", str(weights)]
    _run(argv)
    saved = torch.load(out, weights_only=False)
    assert saved["__author__"] == "d2_involution"
    assert saved["matching_heuristics"] == (prefix == "")

    classifier = torch.load(weights, weights_only=False)["model"]
    model = _faster_rcnn()
    fit = load_backbone_weights(model, str(out))
    assert sorted(k for k, *_ in fit.not_fitting) == [prefix + k for k in STEM_GENERATOR]
    for _, shape_ckpt, target, shape_model in fit.not_fitting:
        assert target.startswith("backbone.bottom_up.stem.involution.conv2.conv.")
        assert shape_ckpt[0] == 9 * 2 and shape_model[0] == 49 * 2
    assert fit.unused == []

    state = model.state_dict()
    # BatchNorm step counters are not exported (they are not weights).
    backbone_keys = [
        k
        for k in state
        if k.startswith("backbone.bottom_up.") and not k.endswith("num_batches_tracked")
    ]
    lost = sorted(set(backbone_keys) - set(fit.loaded))
    assert lost == ["backbone.bottom_up." + k for k in STEM_GENERATOR]
    compared = 0
    for key in backbone_keys:
        if key in lost:
            continue
        source = classifier["backbone." + key[len("backbone.bottom_up.") :]]
        assert torch.equal(state[key], source), key
        compared += 1
    assert compared == len(backbone_keys) - 2 > 100

    # Plain Detectron2 loading (what MODEL.WEIGHTS does) gives the same weights.
    plain = _faster_rcnn()
    DetectionCheckpointer(plain).load(str(out))
    for key, value in plain.state_dict().items():
        if key.startswith("backbone.bottom_up.") and key not in lost:
            assert torch.equal(value, state[key]), key


def test_export_backbone_api_errors(tmp_path):
    model = imagenet_classifier(26, 3)
    with pytest.raises(ValueError, match=".pth or .pkl"):
        export_backbone(model, str(tmp_path / "x.bin"))
    with pytest.raises(ValueError, match="prefix"):
        export_backbone(model, str(tmp_path / "x.pth"), prefix="backbone")
    with pytest.raises(ValueError, match="backbone"):
        export_backbone({"fc.weight": torch.zeros(1)}, str(tmp_path / "x.pth"))
    pkl = export_backbone(model, str(tmp_path / "x.pkl"))
    assert "res5.0.conv1.weight" in pkl and not any(k.startswith("fc.") for k in pkl)


def test_builtin_shapes_folder_is_the_default(tmp_path):
    cfg = get_cls_cfg()
    root = resolve_dataset_root(cfg.DATASETS.CLS.ROOT)
    ds = ImageFolderClassification(root, "val", is_train=False, crop_size=56, resize=64)
    assert len(ds.classes) >= 2 and len(ds) > 0
