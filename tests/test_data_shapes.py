"""The synthetic shapes generator: determinism, safe caching, valid annotations, registration."""

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from detectron2.data import MetadataCatalog
from pycocotools import mask as mask_util

import d2_involution  # noqa: F401  (registers the datasets)
from d2_involution.data import (
    IGNORE_LABEL,
    SEM_SEG_CLASSES,
    SHAPE_CLASSES,
    generate_shapes_classification,
    generate_shapes_split,
    shapes,
    shapes_split_params,
)


def _files(folder: str) -> dict:
    root = Path(folder)
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    a = generate_shapes_split(str(tmp_path / "a"), "train", num_images=3, image_size=96, seed=7)
    b = generate_shapes_split(str(tmp_path / "b"), "train", num_images=3, image_size=96, seed=7)
    c = generate_shapes_split(str(tmp_path / "c"), "train", num_images=3, image_size=96, seed=8)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert sorted(fa) == [
        "images/000000.png",
        "images/000001.png",
        "images/000002.png",
        "instances.json",
        "manifest.json",
        "sem_seg/000000.png",
        "sem_seg/000001.png",
        "sem_seg/000002.png",
    ]
    assert fa == fb
    for name in ("images/000000.png", "images/000001.png", "sem_seg/000002.png"):
        assert fa[name] != fc[name], name


def test_image_does_not_depend_on_split_size_or_other_split(tmp_path):
    small = _files(generate_shapes_split(str(tmp_path / "s"), "train", 2, image_size=64))
    large = _files(generate_shapes_split(str(tmp_path / "l"), "train", 4, image_size=64))
    val = _files(generate_shapes_split(str(tmp_path / "l"), "val", 2, image_size=64))
    assert small["images/000001.png"] == large["images/000001.png"]
    assert val["images/000000.png"] != large["images/000000.png"]


def test_generation_is_cached_and_regenerated_on_new_parameters(tmp_path):
    root = str(tmp_path)
    folder = generate_shapes_split(root, "val", num_images=2, image_size=64)
    marker = os.path.join(folder, "images", "000000.png")
    stamp = os.stat(marker).st_mtime_ns
    assert generate_shapes_split(root, "val", num_images=2, image_size=64) == folder
    assert os.stat(marker).st_mtime_ns == stamp  # reused, not rewritten

    generate_shapes_split(root, "val", num_images=3, image_size=64)
    with open(os.path.join(folder, "manifest.json")) as f:
        assert json.load(f)["num_images"] == 3
    assert len(os.listdir(os.path.join(folder, "images"))) == 3
    assert sorted(os.listdir(root)) == [".val.lock", "val"]  # no temporary leftovers


def test_interrupted_generation_leaves_no_dataset(tmp_path, monkeypatch):
    calls = []

    def failing_write(path, array):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        cv2.imwrite(str(path), array)

    monkeypatch.setattr(shapes, "_write_png", failing_write)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes_split(str(tmp_path), "train", num_images=4, image_size=64)
    assert sorted(os.listdir(tmp_path)) == [".train.lock"]
    monkeypatch.undo()
    folder = generate_shapes_split(str(tmp_path), "train", num_images=4, image_size=64)
    assert len(os.listdir(os.path.join(folder, "images"))) == 4


def _generate_small(root: str) -> str:
    return generate_shapes_split(root, "train", num_images=6, image_size=64)


def test_concurrent_generation_happens_once(tmp_path, monkeypatch):
    """Processes racing for the same split wait on the lock and reuse the finished folder."""
    import multiprocessing

    log = tmp_path / "writes.log"
    write_png = shapes._write_png

    def logged_write(path, array):
        with open(log, "a") as f:
            f.write(f"{path.name}\n")
        write_png(path, array)

    monkeypatch.setattr(shapes, "_write_png", logged_write)  # inherited by the forked workers
    root = tmp_path / "root"
    with multiprocessing.get_context("fork").Pool(3) as pool:
        folders = pool.map(_generate_small, [str(root)] * 3)
    assert folders == [str(root / "train")] * 3
    assert len(log.read_text().split()) == 12  # 6 images + 6 labels, written by one process
    assert sorted(os.listdir(root)) == [".train.lock", "train"]
    monkeypatch.undo()
    assert _files(folders[0]) == _files(generate_shapes_split(str(tmp_path / "x"), "train", 6, 64))


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "mine.txt").write_text("user data")
    with pytest.raises(ValueError, match="not written by d2_involution"):
        generate_shapes_split(str(tmp_path), "train", num_images=1, image_size=64)
    assert (tmp_path / "train" / "mine.txt").read_text() == "user data"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_images": 0}, ValueError, "num_images must be >= 1, got 0"),
        ({"image_size": "256"}, TypeError, "image_size must be an int, got str"),
        ({"seed": -1}, ValueError, "seed must be >= 0, got -1"),
        ({"split": "../x"}, ValueError, "split must be a plain folder name"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error, match):
    args = {"root": str(tmp_path), "split": "train", "num_images": 1, "image_size": 64}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        generate_shapes_split(**args)


def _check_split(dicts, sem_seg_by_image=None):
    seen = set()
    for d in dicts:
        h, w = d["height"], d["width"]
        annos = d["annotations"]
        assert len(annos) >= 1, d["file_name"]
        union = np.zeros((h, w), dtype=np.int64)
        expected_label = np.zeros((h, w), dtype=np.uint8)
        for a in annos:
            assert a["iscrowd"] == 0
            assert 0 <= a["category_id"] < len(SHAPE_CLASSES)
            seen.add(a["category_id"])
            mask = mask_util.decode(a["segmentation"]).astype(bool)
            assert mask.shape == (h, w)
            ys, xs = np.nonzero(mask)
            x, y, bw, bh = a["bbox"]
            assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h, a["bbox"]
            assert [x, y, bw, bh] == [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1]
            assert mask_util.area(a["segmentation"]) == mask.sum() > 0.0015 * h * w
            union += mask
            expected_label[mask] = a["category_id"] + 1
        assert union.max() == 1, "visible masks of one image must not overlap"
        if sem_seg_by_image is not None:
            label = cv2.imread(sem_seg_by_image[os.path.basename(d["file_name"])], -1)
            np.testing.assert_array_equal(label, expected_label)
    return seen


def test_val_annotations_are_valid(shapes_val_dicts, shapes_sem_seg_val_dicts):
    params = shapes_split_params("val")
    assert len(shapes_val_dicts) == params["num_images"]
    sem = {
        os.path.basename(d["file_name"]): d["sem_seg_file_name"] for d in shapes_sem_seg_val_dicts
    }
    assert set(sem) == {os.path.basename(d["file_name"]) for d in shapes_val_dicts}
    assert _check_split(shapes_val_dicts, sem) == set(range(len(SHAPE_CLASSES)))
    image = cv2.imread(shapes_val_dicts[0]["file_name"])
    assert image.shape == (params["image_size"], params["image_size"], 3)


def test_train_annotations_are_valid(shapes_train_dicts):
    params = shapes_split_params("train")
    assert len(shapes_train_dicts) == params["num_images"]
    assert _check_split(shapes_train_dicts[:100]) == set(range(len(SHAPE_CLASSES)))
    with open(os.path.join(params["root"], "train", "manifest.json")) as f:
        low, high = json.load(f)["objects_per_image"]
    counts = [len(d["annotations"]) for d in shapes_train_dicts]
    # occluded shapes may be dropped, so a scene can hold fewer than `low` but never more than `high`
    assert min(counts) >= 1 and max(counts) <= high and np.mean(counts) > low - 1


def test_masks_are_the_visible_pixels_in_the_image(shapes_val_dicts):
    """A shape is a uniformly shaded colour: its pixels are far closer to its own mean colour than
    the pixels of the ring just outside its visible mask are."""
    d = shapes_val_dicts[3]
    image = cv2.imread(d["file_name"]).astype(np.float32)
    for a in d["annotations"]:
        mask = mask_util.decode(a["segmentation"]).astype(bool)
        inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        ring = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~mask
        colour = image[inner].mean(axis=0)
        inside = np.linalg.norm(image[inner] - colour, axis=1).mean()
        outside = np.linalg.norm(image[ring] - colour, axis=1).mean()
        assert outside > 2 * inside, (inside, outside)


def test_registered_metadata(datasets_root):
    for split in ("train", "val"):
        meta = MetadataCatalog.get(f"shapes_{split}")
        assert meta.evaluator_type == "coco"
        assert meta.thing_classes == list(SHAPE_CLASSES)
        assert meta.json_file == os.path.join(datasets_root, "shapes", split, "instances.json")
        assert os.path.isfile(meta.json_file) and os.path.isdir(meta.image_root)
        with open(meta.json_file) as f:
            coco = json.load(f)
        assert [c["name"] for c in coco["categories"]] == list(SHAPE_CLASSES)
        sem = MetadataCatalog.get(f"shapes_sem_seg_{split}")
        assert sem.evaluator_type == "sem_seg"
        assert sem.stuff_classes == list(SEM_SEG_CLASSES)
        assert sem.ignore_label == IGNORE_LABEL == 255
        assert os.path.isdir(sem.sem_seg_root)


def test_classification_folder(shapes_classification_root, tmp_path):
    root = Path(shapes_classification_root)
    for split, count in (("train", 20), ("val", 5)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(SHAPE_CLASSES)
        for name in SHAPE_CLASSES:
            files = sorted((root / split / name).glob("*.png"))
            assert len(files) == count
    image = cv2.imread(str(root / "val" / "star" / "00000.png"))
    assert image.shape == (64, 64, 3)
    again = generate_shapes_classification(
        str(tmp_path / "c"), num_train_per_class=20, num_val_per_class=5, image_size=64, seed=0
    )
    assert _files(again) == _files(str(root))
    other = generate_shapes_classification(
        str(tmp_path / "d"), num_train_per_class=1, num_val_per_class=1, image_size=64, seed=1
    )
    assert _files(other)["val/star/00000.png"] != _files(str(root))["val/star/00000.png"]


def test_val_has_occlusions(shapes_val_dicts):
    """Some shapes touch or hide parts of others (their visible masks are 4-adjacent)."""
    touching = 0
    for d in shapes_val_dicts:
        masks = [mask_util.decode(a["segmentation"]) for a in d["annotations"]]
        for i, m in enumerate(masks):
            grown = cv2.dilate(m, np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.uint8))
            touching += any((grown & other).any() for j, other in enumerate(masks) if j != i)
    assert touching >= 10


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"radius_range": (0.3, 0.1)}, "radius_range must satisfy"),
        ({"num_objects": 2, "classes": [0]}, "classes must have num_objects=2 entries, got 1"),
        ({"num_objects": 0}, "num_objects must be >= 1, got 0"),
        ({"num_objects": 1, "classes": [5]}, r"classes must be indices in \[0, 5\), got \[5\]"),
    ],
)
def test_render_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        shapes.render_shapes_scene(np.random.default_rng(0), 64, **kwargs)


def test_render_respects_requested_classes():
    rng = np.random.default_rng(0)
    for cls in range(len(SHAPE_CLASSES)):
        image, instances = shapes.render_shapes_scene(
            rng, 64, 1, radius_range=(0.3, 0.3), classes=[cls]
        )
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert [c for c, _ in instances] == [cls]
