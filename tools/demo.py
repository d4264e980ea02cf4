#!/usr/bin/env python
"""Run a trained model on images: visualised images and one JSON of predictions.

    python tools/demo.py --config-file configs/Shapes/mask_rcnn_rednet26_fpn.yaml \
        --input img.png some/folder "more/*.jpg" --output demo_out \
        --confidence-threshold 0.5 --opts MODEL.WEIGHTS output/model_final.pth MODEL.DEVICE cpu

Writes ``OUTPUT/<image name>.png`` (predictions drawn with Detectron2's ``Visualizer``) and
``OUTPUT/predictions.json``, a list with one record per image::

    {"file_name": str, "height": int, "width": int,
     "instances": [{"bbox": [x0, y0, x1, y1], "score": float, "category_id": int,
                    "category_name": str, "segmentation": {"size": [h, w], "counts": str}}],
     "sem_seg": {"file_name": "<image name>_sem_seg.png", "classes": {"<id>": "<name>", ...}}}

``--grid FILE`` also writes all the drawn images tiled into one picture (``--grid-columns`` per
row; ``--scale`` draws every image that many times larger, so labels stay readable on small
images)::

    python tools/demo.py --config-file configs/Shapes/mask_rcnn_rednet26_fpn.yaml \
        --input "datasets/shapes/val/images/00000[0-7].png" --output demo_out --scale 3 \
        --grid docs/shapes_predictions.png --opts MODEL.WEIGHTS output/.../model_final.pth

``instances`` is present for detectors (``segmentation``, COCO RLE, only for mask models);
``sem_seg`` for semantic segmentation: the per-pixel arg-max class index is stored as a
single-channel PNG (8-bit, or 16-bit with more than 255 classes) next to the JSON, and ``classes``
names the classes that occur in it.
"""

import d2_involution  # isort: skip  # noqa: F401  (first: detectron2 compat + registrations)
import argparse
import glob
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import ColorMode, Visualizer
from PIL import Image

from d2_involution import add_involution_config

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="d2_involution predictor demo")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="model config")
    parser.add_argument(
        "--input", nargs="+", required=True, help="image files, folders or glob patterns"
    )
    parser.add_argument("--output", required=True, help="folder for images and predictions.json")
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="minimum score for instances to be kept (detectors)",
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="draw the pictures this many times larger"
    )
    parser.add_argument("--grid", metavar="FILE", help="also tile all pictures into this image")
    parser.add_argument(
        "--grid-columns", type=int, default=4, help="pictures per row of --grid (default 4)"
    )
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS x.pth MODEL.DEVICE cpu",
    )
    return parser


def setup_cfg(args: argparse.Namespace) -> CfgNode:
    """Config from the file and ``--opts``, with every detector's score threshold set."""
    if not 0.0 <= args.confidence_threshold <= 1.0:
        raise ValueError(
            f"--confidence-threshold must be in [0, 1], got {args.confidence_threshold}"
        )
    if not args.scale > 0:
        raise ValueError(f"--scale must be positive, got {args.scale}")
    if args.grid_columns < 1:
        raise ValueError(f"--grid-columns must be >= 1, got {args.grid_columns}")
    cfg = get_cfg()
    add_involution_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = args.confidence_threshold
    cfg.freeze()
    return cfg


def collect_inputs(patterns: Sequence[str]) -> List[str]:
    """Image paths from files, folders (their images, sorted) and glob patterns, in order."""
    paths: List[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(pattern, f)
                for f in os.listdir(pattern)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        if not found:
            raise ValueError(
                f"--input: {pattern!r} is no image file, folder of images or glob match"
            )
        paths.extend(found)
    return paths


def instances_to_json(instances: Any, class_names: Optional[List[str]]) -> List[Dict[str, Any]]:
    """Boxes (XYXY, absolute pixels), scores, classes and masks (COCO RLE) as plain Python."""
    instances = instances.to("cpu")
    boxes = instances.pred_boxes.tensor.tolist() if instances.has("pred_boxes") else None
    masks = instances.pred_masks.numpy() if instances.has("pred_masks") else None
    records = []
    for i in range(len(instances)):
        category_id = int(instances.pred_classes[i])
        record: Dict[str, Any] = {
            "score": float(instances.scores[i]),
            "category_id": category_id,
            "category_name": (
                class_names[category_id]
                if class_names and category_id < len(class_names)
                else str(category_id)
            ),
        }
        if boxes is not None:
            record["bbox"] = [round(v, 2) for v in boxes[i]]
        if masks is not None:
            rle = mask_util.encode(np.asfortranarray(masks[i].astype(np.uint8)))
            record["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode()}
        records.append(record)
    return records


def save_sem_seg(sem_seg: torch.Tensor, path: str) -> np.ndarray:
    """Arg-max class indices of (C, H, W) scores, saved as a single-channel PNG; returns them."""
    labels = sem_seg.argmax(dim=0).cpu().numpy()
    dtype = np.uint8 if sem_seg.shape[0] <= 255 else np.uint16
    Image.fromarray(labels.astype(dtype)).save(path)
    return labels


def tile_images(images: Sequence[np.ndarray], columns: int, gap: int = 4) -> np.ndarray:
    """HxWx3 uint8 images in rows of ``columns``, top-left aligned on white, ``gap`` pixels apart."""
    if not images:
        raise ValueError("tile_images: no images")
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    rows = (len(images) + columns - 1) // columns
    cols = min(columns, len(images))
    grid = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        y, x = (i // columns) * (h + gap), (i % columns) * (w + gap)
        grid[y : y + im.shape[0], x : x + im.shape[1]] = im
    return grid


def _unique_stem(path: str, used: Dict[str, int]) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    count = used.get(stem, 0)
    used[stem] = count + 1
    return stem if count == 0 else f"{stem}_{count}"


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Predict on every input image; returns the records written to predictions.json."""
    args = get_parser().parse_args(argv)
    cfg = setup_cfg(args)
    paths = collect_inputs(args.input)
    os.makedirs(args.output, exist_ok=True)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused")
    predictor = DefaultPredictor(cfg)
    records: List[Dict[str, Any]] = []
    pictures: List[np.ndarray] = []
    used: Dict[str, int] = {}
    for path in paths:
        image = read_image(path, format="BGR")
        predictions = predictor(image)
        stem = _unique_stem(path, used)
        record: Dict[str, Any] = {
            "file_name": path,
            "height": int(image.shape[0]),
            "width": int(image.shape[1]),
        }
        if "sem_seg" not in predictions and "instances" not in predictions:
            raise ValueError(
                f"--config-file: the model returned {sorted(predictions)}; this demo draws "
                "'instances' (detectors) and 'sem_seg' (semantic segmentation)"
            )
        visualizer = Visualizer(
            image[:, :, ::-1], metadata, scale=args.scale, instance_mode=ColorMode.IMAGE
        )
        if "sem_seg" in predictions:
            seg_name = f"{stem}_sem_seg.png"
            labels = save_sem_seg(predictions["sem_seg"], os.path.join(args.output, seg_name))
            names = metadata.get("stuff_classes", None)
            record["sem_seg"] = {
                "file_name": seg_name,
                "classes": {
                    str(c): names[c] if names and c < len(names) else str(c)
                    for c in np.unique(labels).tolist()
                },
            }
            vis = visualizer.draw_sem_seg(torch.from_numpy(labels))
        if "instances" in predictions:
            record["instances"] = instances_to_json(
                predictions["instances"], metadata.get("thing_classes", None)
            )
            vis = visualizer.draw_instance_predictions(predictions["instances"].to("cpu"))
        vis.save(os.path.join(args.output, f"{stem}.png"))
        if args.grid:
            pictures.append(vis.get_image())
        records.append(record)
        found = [f"{len(record['instances'])} instances"] if "instances" in record else []
        if "sem_seg" in record:
            found.append(f"classes {sorted(map(int, record['sem_seg']['classes']))}")
        print(f"{path}: {', '.join(found)}", file=sys.stderr)
    with open(os.path.join(args.output, "predictions.json"), "w") as f:
        json.dump(records, f)
    if args.grid:
        Image.fromarray(tile_images(pictures, args.grid_columns)).save(args.grid)
    return records


if __name__ == "__main__":
    main()
