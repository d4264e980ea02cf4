"""End-to-end: configs/Shapes/ models train with train_net.py's Trainer on CPU and learn.

CI budget: the configs' full schedules take 4.5-9 min each on one core (docs/training.md). Here:

* the main job (Faster R-CNN, conv FPN) trains a shortened schedule, is re-evaluated with
  ``--eval-only`` on the saved checkpoint and runs through tools/demo.py. Its box AP50 must be far
  above the untrained model's, evaluated in the same test on the same val split (margin 20 points;
  measured 31.4 vs 0.0), and above a detector that finds the same shapes but not their classes:
  its own boxes, each given every class at its score (margin 10 points; measured 31.4 vs 15.6);
* the semantic FPN (conv neck) fine-tunes a shortened schedule from ``shapes-pretrained://rednet26``
  (in the tests the shortened pre-training of conftest.py) and must beat, on shapes_sem_seg_val,
  the all-background prediction in mIoU and an "objectness-only" model in the mean IoU of the five
  shape classes: its own foreground with classes that ignore the shapes (all of it the one class
  that scores best, or a random class per pixel). Margins and measured values at SEM_SEG_MARGINS;
* every other config is smoke-trained (a few iterations, then the full evaluation).
"""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor, default_argument_parser
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_net  # noqa: E402

SHAPES = REPO / "configs" / "Shapes"
# config -> (task, metric, margin over the untrained model, overrides). Measured with these
# settings (one torch thread, seed 42; docs/training.md): box AP50 31.4, untrained 0.0 (2026-12-07).
TRAINED: Dict[str, Tuple[str, str, float, Tuple[str, ...]]] = {
    "faster_rcnn_rednet26_fpn.yaml": (
        "bbox",
        "AP50",
        20.0,
        ("SOLVER.MAX_ITER", "200", "SOLVER.STEPS", "(150,)", "TEST.EVAL_PERIOD", "0"),
    ),
}
# Points of box AP50 by which the trained detector must beat its own class-blind variant
# (measured 2026-12-07: 31.4 vs 15.6).
CLASS_BLIND_MARGIN = 10.0
SEM_SEG = "semantic_fpn_rednet26_fpn.yaml"
SEM_SEG_OPTS = ("SOLVER.MAX_ITER", "400", "TEST.EVAL_PERIOD", "0")
# (mIoU points over all-background, shape-class mean IoU points over objectness-only). Measured
# 2026-12-07 (one thread, beside another job): mIoU 44.6 vs 13.1, shape-class IoU 35.5 vs 8.6.
SEM_SEG_MARGINS = (20.0, 15.0)
SMOKE = sorted(
    p.name
    for p in SHAPES.glob("*.yaml")
    if not p.name.startswith("Base-") and p.name not in TRAINED and p.name != SEM_SEG
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Train with one intra-op thread: on 2 shared cores, 2 threads ran up to 10x slower here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_train_net(config: str, output_dir: Path, *opts: str, eval_only: bool = False) -> dict:
    """``train_net.py --config-file configs/Shapes/<config> [--eval-only] OUTPUT_DIR ... opts``."""
    argv = ["--config-file", str(SHAPES / config)] + (["--eval-only"] if eval_only else [])
    args = default_argument_parser().parse_args(argv + ["OUTPUT_DIR", str(output_dir), *opts])
    return train_net.main(args)


@pytest.fixture(scope="module", params=sorted(TRAINED))
def trained(request, tmp_path_factory):
    """Train one config to its CI length; returns (config, output dir, final results)."""
    config = request.param
    out = tmp_path_factory.mktemp(Path(config).stem)
    results = run_train_net(config, out, *TRAINED[config][3])
    return config, out, results


def test_trains_far_above_untrained(trained, tmp_path):
    config, out, results = trained
    task, metric, margin, _ = TRAINED[config]
    untrained = run_train_net(config, tmp_path, "MODEL.WEIGHTS", "", eval_only=True)
    score = results[task][metric]
    print(f"{config}: {task} {metric} {score:.2f}, untrained {untrained[task][metric]:.2f}")
    assert score >= untrained[task][metric] + margin
    assert (out / "model_final.pth").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))


def _box_ap50(ground_truth: COCO, detections: List[dict]) -> float:
    """COCO box AP50 (in points) of ``detections`` (COCO result dicts, dataset category ids)."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return 100.0 * float(evaluation.stats[1])


def test_beats_class_blind_detector(trained):
    """Finding the shapes is not enough: the classes must be right. The class-blind detector keeps
    the trained model's boxes and scores and predicts every class for each box: what these boxes
    score when the classes are not told apart."""
    config, out, results = trained
    predictions = torch.load(out / "inference" / "instances_predictions.pth", weights_only=False)
    metadata = MetadataCatalog.get("shapes_val")  # json_file: set by the first COCOEvaluator
    ground_truth = COCO(metadata.json_file)
    mapping = metadata.thing_dataset_id_to_contiguous_id
    to_dataset = {contiguous: dataset for dataset, contiguous in mapping.items()}
    detections = [
        {k: v for k, v in inst.items() if k != "segmentation"}
        for image in predictions
        for inst in image["instances"]
    ]
    for det in detections:
        det["category_id"] = to_dataset[det["category_id"]]
    blind = [dict(det, category_id=c) for det in detections for c in sorted(to_dataset.values())]
    score, blind_score = _box_ap50(ground_truth, detections), _box_ap50(ground_truth, blind)
    print(f"{config}: box AP50 {score:.2f}, class-blind {blind_score:.2f}")
    assert score == pytest.approx(results["bbox"]["AP50"], abs=1e-6)  # the same predictions
    assert score >= blind_score + CLASS_BLIND_MARGIN


def test_eval_only_reproduces_final_evaluation(trained, tmp_path):
    config, out, results = trained
    again = run_train_net(
        config, tmp_path, "MODEL.WEIGHTS", str(out / "model_final.pth"), eval_only=True
    )
    task = TRAINED[config][0]
    assert again[task].keys() == results[task].keys()
    for key, value in results[task].items():
        assert again[task][key] == pytest.approx(value, abs=1e-6, nan_ok=True), key


def test_demo_on_trained_model(trained, tmp_path):
    """tools/demo.py (as a command) on two val images: pictures, and JSON with the detections."""
    config, out, _ = trained
    images = [d["file_name"] for d in DatasetCatalog.get("shapes_val")[2:4]]
    cmd = [
        sys.executable,
        str(REPO / "tools" / "demo.py"),
        "--config-file",
        str(SHAPES / config),
        "--input",
        *images,
        "--output",
        str(tmp_path),
        "--confidence-threshold",
        "0.2",
        "--opts",
        "MODEL.WEIGHTS",
        str(out / "model_final.pth"),
        "MODEL.DEVICE",
        "cpu",
    ]
    subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ), timeout=300)
    records = json.loads((tmp_path / "predictions.json").read_text())
    assert [r["file_name"] for r in records] == images
    for image, record in zip(images, records):
        assert (tmp_path / (Path(image).stem + ".png")).is_file()
        assert all(inst["score"] >= 0.2 for inst in record["instances"])
    assert sum(len(r["instances"]) for r in records) >= 1  # the trained detector finds shapes


@pytest.mark.parametrize("config", SMOKE)
def test_smoke_train_and_evaluate(config, tmp_path):
    results = run_train_net(
        config,
        tmp_path,
        "SOLVER.MAX_ITER",
        "3",
        "SOLVER.WARMUP_ITERS",
        "1",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "TEST.DETECTIONS_PER_IMAGE",
        "10",
    )
    task = "sem_seg" if "semantic" in config or "upernet" in config else "bbox"
    assert task in results
    if task == "bbox" and "mask" in config:
        assert "segm" in results
    assert (tmp_path / "model_final.pth").is_file()


@pytest.fixture(scope="module")
def trained_semantic(tmp_path_factory):
    """The semantic FPN fine-tuned to its CI length; returns (output dir, final results)."""
    out = tmp_path_factory.mktemp("semantic")
    return out, run_train_net(SEM_SEG, out, *SEM_SEG_OPTS)


def _ious(predictions: List[np.ndarray], labels: List[np.ndarray], classes: int) -> np.ndarray:
    """Per-class IoU in points (NaN for a class absent from both), ignoring label 255."""
    confusion = np.zeros((classes, classes), dtype=np.int64)
    for pred, label in zip(predictions, labels):
        valid = label != 255
        pairs = classes * label[valid].astype(np.int64) + pred[valid]
        confusion += np.bincount(pairs, minlength=classes**2).reshape(classes, classes)
    hits = np.diag(confusion).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 * hits / (confusion.sum(0) + confusion.sum(1) - hits)


def test_semantic_model_tells_the_shapes_apart(trained_semantic, tmp_path):
    """A model that learned background only scores shape-class IoU 0; one that finds the shapes
    but not their classes is the objectness-only baseline. Measured: docs/training.md, "CI"."""
    out, results = trained_semantic
    args = default_argument_parser().parse_args(
        ["--config-file", str(SHAPES / SEM_SEG), "MODEL.WEIGHTS", str(out / "model_final.pth")]
    )
    predictor = DefaultPredictor(train_net.setup(args))
    dicts = DatasetCatalog.get("shapes_sem_seg_val")
    classes = len(MetadataCatalog.get("shapes_sem_seg_val").stuff_classes)
    labels = [np.asarray(Image.open(d["sem_seg_file_name"])) for d in dicts]
    with torch.no_grad():
        predictions = [
            predictor(read_image(d["file_name"], format="BGR"))["sem_seg"].argmax(0).numpy()
            for d in dicts
        ]
    model = _ious(predictions, labels, classes)
    # The same predictions as the final evaluation's (Detectron2's SemSegEvaluator).
    assert np.nanmean(model) == pytest.approx(results["sem_seg"]["mIoU"], abs=1e-3)
    background = _ious([np.zeros_like(p) for p in predictions], labels, classes)
    rng = np.random.default_rng(0)
    blind = [[np.where(p > 0, c, 0) for p in predictions] for c in range(1, classes)]
    blind.append([np.where(p > 0, rng.integers(1, classes, p.shape), 0) for p in predictions])
    objectness = max(np.nanmean(_ious(b, labels, classes)[1:]) for b in blind)
    shapes = np.nanmean(model[1:])
    print(
        f"semantic FPN: mIoU {np.nanmean(model):.2f} (all-background {np.nanmean(background):.2f}),"
        f" shape-class IoU {shapes:.2f} (objectness-only {objectness:.2f})"
    )
    assert np.nanmean(model) >= np.nanmean(background) + SEM_SEG_MARGINS[0]
    assert shapes >= objectness + SEM_SEG_MARGINS[1]
