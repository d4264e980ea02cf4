"""A deterministic synthetic "shapes" dataset: the built-in data that needs no download.

Each scene is a textured, noisy background with a few filled shapes (circle, square, triangle,
ellipse, star) of random size, position and colour, upright up to a small random tilt; colours are
not tied to classes. Shapes may
overlap: every instance mask is the exact *visible* part of its shape after occlusion by the shapes
painted above it, and a shape left with too little visible area is removed from the scene (it is
neither drawn nor annotated). Masks are rasterised once and the same pixels are painted, so masks,
boxes, semantic labels and images agree exactly.

One generation writes a split folder with the images, a COCO instances json (RLE masks) and
semantic label PNGs:

    <root>/<split>/images/000000.png        RGB image
    <root>/<split>/sem_seg/000000.png       uint8 labels: 0 = background, k = SHAPE_CLASSES[k-1]
    <root>/<split>/instances.json           COCO format, category ids 1..len(SHAPE_CLASSES)
    <root>/<split>/manifest.json            generation parameters (written last)

Generation is atomic: it happens in a temporary sibling folder, renamed into place when complete,
under a file lock so that concurrent processes generate once. A folder whose manifest does not
match the requested parameters is regenerated. Every image is drawn from its own random stream
``(seed, split, index)``, so the same parameters always give the same bytes and image ``i`` does
not depend on how many images the split has.
"""

import contextlib
import json
import os
import shutil
import tempfile
import uuid
import zlib
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = [
    "SHAPE_CLASSES",
    "SEM_SEG_CLASSES",
    "IGNORE_LABEL",
    "datasets_root",
    "render_shapes_scene",
    "generate_shapes_split",
    "generate_shapes_classification",
    "generate_once",
]

SHAPE_CLASSES: Tuple[str, ...] = ("circle", "square", "triangle", "ellipse", "star")
SEM_SEG_CLASSES: Tuple[str, ...] = ("background",) + SHAPE_CLASSES
IGNORE_LABEL = 255
MANIFEST = "manifest.json"
# Bump when the rendering changes, so that cached copies made by older code are regenerated.
FORMAT_VERSION = 2

_SUBPIXEL_BITS = 4  # cv2.fillPoly "shift": vertices on a 1/16-pixel grid
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]  # noisy images barely compress further
_NOISE_STD = 4.0  # pixel noise of every image, in grey levels
# Nominal radii (fractions of the image side) in the classification images: the dominant shape
# and the small shapes of other classes below it.
_CLS_RADIUS = (0.22, 0.32)
# Shapes stand upright, tilted by at most this angle. With any rotation, classes are far slower
# to learn from scratch (docs/datasets.md, "How the shapes data was designed").
_MAX_TILT_DEGREES = 20.0
_MAX_TILT = float(np.deg2rad(_MAX_TILT_DEGREES))
# Detection scenes: shapes drawn per image (before the mostly hidden ones are removed) and their
# nominal radius as a fraction of the image side.
_OBJECTS_PER_IMAGE = (3, 6)
_SCENE_RADIUS = (0.1, 0.2)
_CLS_DISTRACTOR_RADIUS = (0.08, 0.12)


def datasets_root() -> str:
    """The datasets root as Detectron2 defines it: ``$DETECTRON2_DATASETS``, else ./datasets."""
    return os.getenv("DETECTRON2_DATASETS", "datasets")


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """An independent random stream per (seed, stream name, item index)."""
    return np.random.default_rng([seed, zlib.crc32(stream.encode("utf-8")), index])


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _shape_outline(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Vertices (N, 2) of a shape of nominal radius ``r``; sizes chosen for similar areas."""
    if kind in ("circle", "ellipse"):
        t = np.linspace(0.0, 2.0 * np.pi, 96, endpoint=False)
        ax, ay = (r, r) if kind == "circle" else (1.25 * r, 0.55 * r)
        pts = np.stack([ax * np.cos(t), ay * np.sin(t)], axis=1)
    elif kind == "square":
        h = 0.88 * r
        pts = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    elif kind == "triangle":
        t = np.pi / 2 + np.arange(3) * 2.0 * np.pi / 3
        pts = 1.3 * r * np.stack([np.cos(t), np.sin(t)], axis=1)
    elif kind == "star":
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, 1.3 * r, 0.55 * r)
        pts = np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    else:
        raise ValueError(f"kind must be one of {SHAPE_CLASSES}, got {kind!r}")
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return pts @ rot.T + np.array([cx, cy])


def _placed_outline(rng: np.random.Generator, kind: str, r: float, size: int) -> np.ndarray:
    """The outline of a shape, upright up to a random tilt, at a random position where it lies
    wholly inside the image (centred when it is larger than the image)."""
    pts = _shape_outline(kind, 0.0, 0.0, r, rng.uniform(-_MAX_TILT, _MAX_TILT))
    low, high = -pts.min(axis=0), size - 1.0 - pts.max(axis=0)
    centre = rng.uniform(low, high) if np.all(low <= high) else np.full(2, size / 2.0)
    return pts + centre


def _rasterise(outline: np.ndarray, size: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    pts = np.round(outline * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    return mask.astype(bool)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field plus one faint texture: stripes, checks or blotches.

    The texture's period scales with the image (6-15% of its side) and its amplitude (4-10 grey
    levels) stays well under the contrast of the shapes, so it is clutter, not a second set of
    edges that look like shapes. Returns float32 HxWx3.
    """
    base = rng.uniform(50.0, 205.0, size=3)
    cells = int(rng.integers(3, 8))
    low = rng.normal(0.0, 1.0, size=(cells, cells, 3)).astype(np.float32)
    low = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC) * rng.uniform(8.0, 20.0)
    img = base.astype(np.float32)[None, None, :] + low
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    texture = int(rng.integers(0, 3))
    amplitude = rng.uniform(4.0, 10.0)
    theta = rng.uniform(0.0, np.pi)
    period = rng.uniform(0.06, 0.15) * size
    u = xx * np.cos(theta) + yy * np.sin(theta)
    if texture == 0:
        pattern = np.sin(2.0 * np.pi * u / period)
    elif texture == 1:
        v = -xx * np.sin(theta) + yy * np.cos(theta)
        pattern = np.sign(np.sin(np.pi * u / period) * np.sin(np.pi * v / period))
    else:
        cells = max(2, size // 16)
        blotch = rng.normal(0.0, 1.0, size=(cells, cells)).astype(np.float32)
        pattern = cv2.resize(blotch, (size, size), interpolation=cv2.INTER_LINEAR)
    tint = rng.uniform(0.5, 1.0, size=3).astype(np.float32)
    return img + (amplitude * pattern)[:, :, None] * tint[None, None, :]


def _pick_colour(
    rng: np.random.Generator, avoid: Sequence[np.ndarray], tries: int = 24
) -> np.ndarray:
    """A random RGB colour as far as possible (at least ~90 apart) from the colours in ``avoid``."""
    best, best_dist = None, -1.0
    for _ in range(tries):
        colour = rng.uniform(0.0, 255.0, size=3)
        dist = min((float(np.linalg.norm(colour - a)) for a in avoid), default=1e9)
        if dist > best_dist:
            best, best_dist = colour, dist
        if dist >= 90.0:
            break
    return best


def render_shapes_scene(
    rng: np.random.Generator,
    image_size: int = 128,
    num_objects: int = 3,
    radius_range: Tuple[float, float] = _SCENE_RADIUS,
    classes: Optional[Sequence[int]] = None,
    min_visible_fraction: float = 0.6,
    min_visible_area: Optional[int] = None,
    noise_std: float = _NOISE_STD,
) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """Draw one scene; returns (RGB uint8 image (S, S, 3), [(class index, visible bool mask)]).

    ``classes`` fixes the class of each shape (bottom to top); otherwise classes are uniform.
    ``radius_range`` is the nominal radius as a fraction of ``image_size``. Shapes whose visible
    part is under ``min_visible_fraction`` of their area or ``min_visible_area`` pixels (default
    0.15% of the image) are removed; the topmost shape is never occluded, so a scene keeps at least
    one shape when its area is large enough. Instances are returned bottom to top.
    """
    size = _check_int("image_size", image_size, 16)
    _check_int("num_objects", num_objects, 1)
    lo, hi = radius_range
    if not 0.0 < lo <= hi <= 0.5:
        raise ValueError(f"radius_range must satisfy 0 < low <= high <= 0.5, got {radius_range}")
    if classes is not None and len(classes) != num_objects:
        raise ValueError(f"classes must have num_objects={num_objects} entries, got {len(classes)}")
    if classes is not None and not all(0 <= int(c) < len(SHAPE_CLASSES) for c in classes):
        raise ValueError(f"classes must be indices in [0, {len(SHAPE_CLASSES)}), got {classes}")

    if min_visible_area is None:
        min_visible_area = max(1, int(0.0015 * size * size))
    background = _background(rng, size)
    shapes = []
    for i in range(num_objects):
        cls = int(classes[i]) if classes is not None else int(rng.integers(len(SHAPE_CLASSES)))
        outline = _placed_outline(rng, SHAPE_CLASSES[cls], rng.uniform(lo, hi) * size, size)
        shapes.append((cls, _rasterise(outline, size)))

    # Top to bottom: a shape's visible part is what no kept shape above it covers.
    covered = np.zeros((size, size), dtype=bool)
    kept: List[Tuple[int, np.ndarray, np.ndarray]] = []
    for cls, full in reversed(shapes):
        visible = full & ~covered
        area = int(visible.sum())
        if area >= min_visible_area and area >= min_visible_fraction * int(full.sum()):
            kept.append((cls, full, visible))
            covered |= full
    kept.reverse()

    colours: List[np.ndarray] = []
    for _, full, _ in kept:
        _fill(rng, background, full, colours)
    return _finish(rng, background, noise_std), [(cls, visible) for cls, _, visible in kept]


def _fill(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, colours: list) -> None:
    """Paint ``mask`` in a new colour, distinct from ``colours`` and the pixels underneath, with a
    gentle linear shading; the colour is appended to ``colours``."""
    colour = _pick_colour(rng, colours + [image[mask].mean(axis=0)])
    colours.append(colour)
    ys, xs = np.nonzero(mask)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    shade = (xs * np.cos(theta) + ys * np.sin(theta)) / image.shape[0] * rng.uniform(0.0, 30.0)
    image[ys, xs] = colour.astype(np.float32)[None, :] + shade.astype(np.float32)[:, None]


def _finish(rng: np.random.Generator, image: np.ndarray, noise_std: float) -> np.ndarray:
    """Add pixel noise and quantise to uint8."""
    image = image + noise_std * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Atomic, cached generation
# ----------------------------------------------------------------------------------------------


def _read_manifest(folder: Path) -> Optional[dict]:
    try:
        with open(folder / MANIFEST) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (no-op where ``fcntl`` is unavailable)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def generate_once(target: Path, manifest: dict, build: Callable[[Path], None]) -> Path:
    """Make the folder ``target`` hold what ``build(tmp_folder)`` writes, unless it already holds
    ``manifest``: built in a temporary sibling, renamed into place, under an inter-process lock,
    so concurrent processes build once and an interrupted build leaves nothing half-written."""
    if _read_manifest(target) == manifest:
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _locked(parent / f".{target.name}.lock"):
        if _read_manifest(target) == manifest:
            return target
        if target.exists() and not (target / MANIFEST).exists() and any(target.iterdir()):
            raise ValueError(
                f"{target} exists but was not written by d2_involution (no {MANIFEST}); "
                "remove it or choose another root"
            )
        # Leftovers of an interrupted generation (only ever created under this lock).
        for stale in parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in parent.glob(f".{target.name}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        try:
            build(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is a normal folder
            with open(tmp / MANIFEST, "w") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
            if target.exists():
                old = parent / f".{target.name}.old-{uuid.uuid4().hex}"
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _write_png(path: Path, array: np.ndarray) -> None:
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), array, _PNG_PARAMS):
        raise OSError(f"could not write {path}")


def _encode_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _detection_manifest(split: str, num_images: int, image_size: int, seed: int) -> dict:
    return {
        "kind": "shapes_detection",
        "format_version": FORMAT_VERSION,
        "split": split,
        "num_images": num_images,
        "image_size": image_size,
        "seed": seed,
        "classes": list(SHAPE_CLASSES),
        "objects_per_image": list(_OBJECTS_PER_IMAGE),
        "radius_range": list(_SCENE_RADIUS),
        "max_tilt_degrees": _MAX_TILT_DEGREES,
    }


def generate_shapes_split(
    root: Optional[str] = None,
    split: str = "train",
    num_images: int = 2000,
    image_size: int = 128,
    seed: int = 0,
) -> str:
    """Generate (once) the detection + semantic split ``<root>/<split>``; returns its path.

    ``root`` defaults to ``$DETECTRON2_DATASETS/shapes``. Each image holds 3-6 shapes (before
    removal of the mostly hidden ones) of nominal radius 10-20% of ``image_size``.
    """
    if not isinstance(split, str) or not split or "/" in split or split.startswith("."):
        raise ValueError(f"split must be a plain folder name like 'train', got {split!r}")
    num_images = _check_int("num_images", num_images, 1)
    image_size = _check_int("image_size", image_size, 32)
    seed = _check_int("seed", seed, 0)
    root_path = Path(root if root is not None else os.path.join(datasets_root(), "shapes"))
    manifest = _detection_manifest(split, num_images, image_size, seed)

    def build(out: Path) -> None:
        (out / "images").mkdir()
        (out / "sem_seg").mkdir()
        images, annotations = [], []
        for index in range(num_images):
            rng = _rng(seed, split, index)
            instances: list = []
            while not instances:  # at least one object per image (re-draws are very rare)
                num_objects = int(rng.integers(_OBJECTS_PER_IMAGE[0], _OBJECTS_PER_IMAGE[1] + 1))
                image, instances = render_shapes_scene(rng, image_size, num_objects)
            name = f"{index:06d}.png"
            _write_png(out / "images" / name, image)
            label = np.zeros((image_size, image_size), dtype=np.uint8)
            for cls, visible in instances:
                label[visible] = cls + 1
            _write_png(out / "sem_seg" / name, label)
            image_id = index + 1
            images.append(
                {"id": image_id, "file_name": name, "height": image_size, "width": image_size}
            )
            for cls, visible in instances:
                ys, xs = np.nonzero(visible)
                x0, y0 = int(xs.min()), int(ys.min())
                w, h = int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": cls + 1,
                        "bbox": [x0, y0, w, h],
                        "area": int(visible.sum()),
                        "segmentation": _encode_rle(visible),
                        "iscrowd": 0,
                    }
                )
        categories = [
            {"id": k + 1, "name": name, "supercategory": "shape"}
            for k, name in enumerate(SHAPE_CLASSES)
        ]
        coco = {
            "info": {"description": "d2_involution synthetic shapes", **manifest},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        with open(out / "instances.json", "w") as f:
            json.dump(coco, f, separators=(",", ":"))

    return str(generate_once(root_path / split, manifest, build))


def generate_shapes_classification(
    root: Optional[str] = None,
    num_train_per_class: int = 1000,
    num_val_per_class: int = 100,
    image_size: int = 48,
    seed: int = 0,
    max_distractors: int = 1,
) -> str:
    """Generate (once) an ImageNet-style folder ``root/{train,val}/<class>/*.png``; returns root.

    Each image shows one dominant shape of its class (nominal radius 22-32% of the image, wholly
    inside it) above up to ``max_distractors`` small shapes of other classes (radius 8-12%).
    ``root`` defaults to ``$DETECTRON2_DATASETS/shapes/classification``.
    """
    num_train_per_class = _check_int("num_train_per_class", num_train_per_class, 1)
    num_val_per_class = _check_int("num_val_per_class", num_val_per_class, 1)
    image_size = _check_int("image_size", image_size, 16)
    seed = _check_int("seed", seed, 0)
    max_distractors = _check_int("max_distractors", max_distractors, 0)
    root_path = Path(
        root if root is not None else os.path.join(datasets_root(), "shapes", "classification")
    )
    manifest = {
        "kind": "shapes_classification",
        "format_version": FORMAT_VERSION,
        "num_train_per_class": num_train_per_class,
        "num_val_per_class": num_val_per_class,
        "image_size": image_size,
        "seed": seed,
        "max_distractors": max_distractors,
        "classes": list(SHAPE_CLASSES),
    }
    counts: Dict[str, int] = {"train": num_train_per_class, "val": num_val_per_class}

    def build(out: Path) -> None:
        for split, per_class in counts.items():
            for cls, name in enumerate(SHAPE_CLASSES):
                folder = out / split / name
                folder.mkdir(parents=True)
                for index in range(per_class):
                    rng = _rng(seed, f"classification-{split}-{name}", index)
                    image = _classification_image(rng, cls, image_size, max_distractors)
                    _write_png(folder / f"{index:05d}.png", image)

    return str(generate_once(root_path, manifest, build))


def _classification_image(
    rng: np.random.Generator, cls: int, size: int, max_distractors: int
) -> np.ndarray:
    """One dominant shape of class ``cls``, wholly inside the image, above small distractors."""
    others = [k for k in range(len(SHAPE_CLASSES)) if k != cls]
    n = int(rng.integers(0, max_distractors + 1))
    distractors = [int(k) for k in rng.choice(others, size=n)] if n else []
    image = _background(rng, size)
    colours: List[np.ndarray] = []
    layers = [(k, _CLS_DISTRACTOR_RADIUS) for k in distractors] + [(cls, _CLS_RADIUS)]
    for k, (lo, hi) in layers:
        outline = _placed_outline(rng, SHAPE_CLASSES[k], rng.uniform(lo, hi) * size, size)
        mask = _rasterise(outline, size)
        if mask.any():
            _fill(rng, image, mask, colours)
    return _finish(rng, image, _NOISE_STD)
