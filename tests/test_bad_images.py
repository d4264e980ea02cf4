"""Unreadable images in detection/segmentation data: skipped with a warning, counted, survived.

A COCO json made from six shapes_val images, one of them truncated and one missing, trains a
Faster R-CNN for 3 iterations through ``train_net.py`` and is evaluated; the loaders alone are
checked on a semantic segmentation split with a missing label file and on a dataset whose images
are all bad.
"""

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser

from d2_involution import add_involution_config
from d2_involution.data.loaders import SkippingTestLoader, build_resumable_train_loader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_net  # noqa: E402

FASTER_RCNN = str(REPO / "configs" / "Shapes" / "faster_rcnn_rednet26_fpn.yaml")
NUM_IMAGES = 6


def _register(name: str, json_file: Path, image_root: Path) -> None:
    for catalog in (DatasetCatalog, MetadataCatalog):
        if name in catalog.list():
            catalog.remove(name)
    register_coco_instances(name, {}, str(json_file), str(image_root))


@pytest.fixture()
def bad_coco(tmp_path, shapes_val_dicts):
    """A registered COCO dataset of 6 images: #1 truncated, #4 missing. Returns (name, files)."""
    source = json.loads(Path(MetadataCatalog.get("shapes_val").json_file).read_text())
    images = source["images"][:NUM_IMAGES]
    ids = {im["id"] for im in images}
    coco = dict(source, images=images)
    coco["annotations"] = [a for a in source["annotations"] if a["image_id"] in ids]
    root = tmp_path / "images"
    root.mkdir()
    src_root = Path(shapes_val_dicts[0]["file_name"]).parent
    for im in images:
        shutil.copy(src_root / im["file_name"], root / im["file_name"])
    truncated, missing = root / images[1]["file_name"], root / images[4]["file_name"]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    missing.unlink()
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    _register("bad_coco_test", tmp_path / "coco.json", root)
    yield "bad_coco_test", (truncated, missing)
    DatasetCatalog.remove("bad_coco_test")
    MetadataCatalog.remove("bad_coco_test")


def test_training_skips_and_counts_bad_images(bad_coco, tmp_path):
    name, (truncated, missing) = bad_coco
    out = tmp_path / "out"
    argv = ["--config-file", FASTER_RCNN, "OUTPUT_DIR", str(out), "SOLVER.IMS_PER_BATCH", "2"]
    argv += ["SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1", "INPUT.MIN_SIZE_TRAIN", "(64,)"]
    argv += ["INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]
    argv += ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", f"('{name}',)"]
    results = train_net.main(default_argument_parser().parse_args(argv))
    # 3 batches of 2 = the whole epoch of 6 images: both bad ones were met, once each.
    log = (out / "log.txt").read_text()
    assert f"Skipping unreadable image {truncated}: OSError" in log
    assert f"Skipping unreadable image {missing}: FileNotFoundError" in log
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    last_step = [m for m in metrics if "total_loss" in m][-1]
    assert last_step["iteration"] == 2 and last_step["skipped_images"] == 2
    assert "Unreadable training images skipped: 2" in log
    assert "Evaluation skipped 2 unreadable images" in log
    assert (out / "model_final.pth").is_file() and "bbox" in results


def _cfg(*opts: str):
    cfg = add_involution_config(get_cfg())
    cfg.merge_from_file(FASTER_RCNN)
    cfg.merge_from_list(["SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)", *opts])
    return cfg


def test_dataset_of_only_bad_images_stops_with_a_clear_error(tmp_path):
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for i in range(4):
        coco["images"].append({"id": i, "file_name": f"{i}.png", "width": 32, "height": 32})
        box = [2.0, 2.0, 10.0, 10.0]
        coco["annotations"].append(
            {"id": i, "image_id": i, "category_id": 1, "bbox": box, "area": 100.0, "iscrowd": 0}
        )
    (tmp_path / "0.png").write_bytes(b"not a png")
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    _register("all_bad_test", tmp_path / "coco.json", tmp_path)
    try:
        loader = build_resumable_train_loader(_cfg("DATASETS.TRAIN", "('all_bad_test',)"))
        with pytest.raises(RuntimeError, match=r"all_bad_test: \d+ images in a row could not"):
            next(iter(loader))
        assert loader.num_skipped >= 4
    finally:
        DatasetCatalog.remove("all_bad_test")
        MetadataCatalog.remove("all_bad_test")


def test_sem_seg_missing_label_file_is_skipped(shapes_sem_seg_val_dicts, tmp_path, caplog):
    dicts = [dict(d) for d in shapes_sem_seg_val_dicts[:3]]
    dicts[1]["sem_seg_file_name"] = str(tmp_path / "missing.png")
    cfg = _cfg("INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64")
    loader = SkippingTestLoader(dicts, DatasetMapper(cfg, is_train=False))
    logger = logging.getLogger("d2_involution.data.loaders")
    logger.addHandler(caplog.handler)  # train_net's setup_logger stops propagation to the root
    try:
        batches = list(loader)
    finally:
        logger.removeHandler(caplog.handler)
    assert [b[0]["file_name"] for b in batches] == [dicts[0]["file_name"], dicts[2]["file_name"]]
    assert all(tuple(b[0]["sem_seg"].shape) == (64, 64) for b in batches)
    assert loader.num_skipped == 1 and len(loader) == 3
    assert any(dicts[1]["file_name"] in r.getMessage() for r in caplog.records)
    assert any("missing.png" in r.getMessage() for r in caplog.records)
