"""ImageNet-style folders: listing, augmentation, resumable distributed loading, bad-image skipping.

Layout: ``root/<split>/<class>/<image>``; classes are the sorted sub-folder names of the training
split (label = index), files are taken by image extension. Images are decoded with PIL as RGB and
batched as uint8 tensors; normalisation happens in the model (as Detectron2's models do).

Training order and augmentation are functions of (seed, position in the sample stream) only, so a
run resumed at iteration ``i`` sees exactly the batches an uninterrupted run sees from ``i`` on,
whatever the number of data-loading workers. An unreadable image is skipped with a warning and
counted (the batch is one image smaller); it never stops training or evaluation.
"""

import logging
import math
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from detectron2.config import CfgNode
from detectron2.data.samplers import InferenceSampler
from detectron2.utils import comm
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import scale_solver_to_actual_batch

__all__ = [
    "IMAGE_EXTENSIONS",
    "BUILTIN_CLASSIFICATION_FOLDERS",
    "ImageFolderClassification",
    "ResumableTrainingSampler",
    "ResumableTrainLoader",
    "resolve_classes_and_batch",
    "resolve_dataset_root",
    "build_cls_test_loader",
    "build_cls_train_loader",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: Built-in folders by name, generated on first use under $DETECTRON2_DATASETS (default ./datasets).
BUILTIN_CLASSIFICATION_FOLDERS = ("shapes_cls",)


def resolve_dataset_root(root: str) -> str:
    """The folder behind ``DATASETS.CLS.ROOT``: a built-in name (generated if absent) or a path."""
    if not isinstance(root, str) or not root:
        raise ValueError(f"DATASETS.CLS.ROOT must be a non-empty string, got {root!r}")
    if root in BUILTIN_CLASSIFICATION_FOLDERS:
        from ..data.shapes import generate_shapes_classification

        if comm.is_main_process():
            generate_shapes_classification()
        comm.synchronize()
        return generate_shapes_classification()
    if not os.path.isdir(root):
        raise ValueError(
            f"DATASETS.CLS.ROOT: {root!r} is neither a built-in folder "
            f"({', '.join(BUILTIN_CLASSIFICATION_FOLDERS)}) nor an existing directory"
        )
    return root


def _list_split(split_dir: str, classes: Optional[Sequence[str]]) -> Tuple[List[str], List]:
    if not os.path.isdir(split_dir):
        raise ValueError(f"classification folder: split directory {split_dir!r} does not exist")
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if classes is None:
        classes = found
    if not classes:
        raise ValueError(f"classification folder: {split_dir!r} has no class sub-folders")
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise ValueError(
            f"classification folder: {split_dir!r} has classes not in the training split: "
            f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    samples = []
    for c in found:
        class_dir = os.path.join(split_dir, c)
        for dirpath, _, files in sorted(os.walk(class_dir, followlinks=True)):
            for name in sorted(files):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, name), index[c]))
    if not samples:
        raise ValueError(f"classification folder: no images under {split_dir!r}")
    return list(classes), samples


def _random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: Sequence[float],
    ratio: Sequence[float],
) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of an Inception-style random crop: area fraction in ``scale``, aspect
    ratio log-uniform in ``ratio``; ten tries, then the central crop clamped to ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    aspect = width / height
    if aspect < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif aspect > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ImageFolderClassification(Dataset):
    """One split of an ImageNet-style folder, with the training or the evaluation transform.

    ``dataset[(index, seed)]`` returns ``{"image": uint8 (3, S, S), "label": int}`` or ``None`` when
    the file cannot be read (warned, and dropped by :func:`collate_skipping_unreadable`). In
    training, ``seed`` fixes the random crop and flip of that sample; evaluation ignores it.
    """

    def __init__(
        self,
        root: str,
        split: str,
        *,
        is_train: bool,
        classes: Optional[Sequence[str]] = None,
        crop_size: int = 224,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        hflip_prob: float = 0.5,
        resize: int = 256,
    ):
        for name, value in (("crop_size", crop_size), ("resize", resize)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (0 < scale[0] <= scale[1] <= 1.0):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {tuple(scale)}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {tuple(ratio)}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        self.split_dir = os.path.join(root, split)
        self.classes, self.samples = _list_split(self.split_dir, classes)
        self.is_train = is_train
        self.crop_size = crop_size
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.hflip_prob = hflip_prob
        self.resize = resize

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, path: str) -> Optional[Image.Image]:
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                return img.convert("RGB")
        except Exception as e:  # noqa: BLE001 - any decoding failure means "skip this file"
            logger.warning(f"Skipping unreadable image {path}: {type(e).__name__}: {e}")
            return None

    def __getitem__(self, key) -> Optional[Dict]:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        path, label = self.samples[index]
        img = self._read(path)
        if img is None:
            return None
        size = [self.crop_size, self.crop_size]
        if self.is_train:
            rng = np.random.default_rng(seed)
            top, left, h, w = _random_resized_crop_box(
                img.width, img.height, rng, self.scale, self.ratio
            )
            img = TF.resized_crop(img, top, left, h, w, size, TF.InterpolationMode.BILINEAR)
            if rng.uniform() < self.hflip_prob:
                img = TF.hflip(img)
        else:
            img = TF.resize(img, self.resize, TF.InterpolationMode.BILINEAR)
            img = TF.center_crop(img, size)
        array = np.asarray(img, dtype=np.uint8).copy()
        return {"image": torch.from_numpy(array).permute(2, 0, 1), "label": label}


def collate_skipping_unreadable(items: List[Optional[Dict]]) -> Dict:
    """Stack the readable samples; ``num_skipped`` counts the unreadable ones of this batch."""
    good = [x for x in items if x is not None]
    if good:
        images = torch.stack([x["image"] for x in good])
    else:
        images = torch.zeros((0, 3, 1, 1), dtype=torch.uint8)
    labels = torch.tensor([x["label"] for x in good], dtype=torch.long)
    return {"image": images, "label": labels, "num_skipped": len(items) - len(good)}


class ResumableTrainingSampler(Sampler):
    """An endless, per-epoch shuffled stream of ``(index, augmentation_seed)``, sharded by rank.

    Global stream position ``p`` holds sample ``perm_e[p % N]`` of epoch ``e = p // N`` (``perm_e``
    a permutation drawn from ``(seed, e)``) with augmentation seed ``(seed, p)``; rank ``r`` of
    ``W`` takes positions ``r, r + W, r + 2W, ...`` starting at its ``start``-th one.
    """

    def __init__(self, size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.size, self.seed, self.start = size, int(seed), start
        self.rank, self.world_size = rank, world_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator()
        generator.manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator)

    def __iter__(self) -> Iterator[Tuple[int, Tuple[int, int]]]:
        position = self.start * self.world_size + self.rank
        epoch, perm = -1, None
        while True:
            if position // self.size != epoch:
                epoch = position // self.size
                perm = self._permutation(epoch)
            yield int(perm[position % self.size]), (self.seed, position)
            position += self.world_size


class ResumableTrainLoader:
    """The training batches of one process, built lazily so that a resume can set the start.

    ``start_iter`` (optimizer steps already done) and ``seed`` may be changed until iteration
    begins; each step consumes ``accumulation_steps`` batches. Batches whose images were all
    unreadable are dropped. ``num_skipped`` counts the unreadable images seen so far.
    """

    def __init__(
        self,
        dataset: ImageFolderClassification,
        batch_size: int,
        *,
        seed: int,
        accumulation_steps: int = 1,
        num_workers: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.accumulation_steps = accumulation_steps
        self.num_workers = num_workers
        self.start_iter = 0
        self.num_skipped = 0

    def _loader(self) -> DataLoader:
        sampler = ResumableTrainingSampler(
            len(self.dataset),
            self.seed,
            start=self.start_iter * self.batch_size * self.accumulation_steps,
            rank=comm.get_rank(),
            world_size=comm.get_world_size(),
        )
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_skipping_unreadable,
            pin_memory=torch.cuda.is_available(),
            drop_last=True,
            persistent_workers=False,
        )

    def __iter__(self) -> Iterator[Dict]:
        logger.info(
            f"Training data: {len(self.dataset)} images, {len(self.dataset.classes)} classes, "
            f"from iteration {self.start_iter} (seed {self.seed})"
        )
        for batch in self._loader():
            if batch["num_skipped"]:
                self.num_skipped += batch["num_skipped"]
                logger.warning(f"Unreadable training images skipped so far: {self.num_skipped}")
            if len(batch["label"]):
                yield batch


def _train_dataset(cfg: CfgNode, root: str) -> ImageFolderClassification:
    c = cfg.INPUT.CLS
    return ImageFolderClassification(
        root,
        cfg.DATASETS.CLS.TRAIN_SPLIT,
        is_train=True,
        crop_size=c.TRAIN_CROP_SIZE,
        scale=c.TRAIN_SCALE,
        ratio=c.TRAIN_RATIO,
        hflip_prob=c.HFLIP_PROB,
    )


def build_cls_train_loader(cfg: CfgNode, seed: int) -> ResumableTrainLoader:
    """The training loader of this process (per-GPU batch from the resolved config)."""
    from .config import per_gpu_batch

    dataset = _train_dataset(cfg, resolve_dataset_root(cfg.DATASETS.CLS.ROOT))
    return ResumableTrainLoader(
        dataset,
        per_gpu_batch(cfg, comm.get_world_size()),
        seed=seed,
        accumulation_steps=cfg.SOLVER.CLS.ACCUMULATION_STEPS,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )


def build_cls_test_loader(cfg: CfgNode) -> DataLoader:
    """The validation loader of this process: each rank gets a contiguous share of the images."""
    root = resolve_dataset_root(cfg.DATASETS.CLS.ROOT)
    c = cfg.INPUT.CLS
    # Labels follow the training split's classes; a folder with only a val split uses its own.
    train_dir = os.path.join(root, cfg.DATASETS.CLS.TRAIN_SPLIT)
    train_classes = _list_classes(train_dir) if os.path.isdir(train_dir) else None
    dataset = ImageFolderClassification(
        root,
        cfg.DATASETS.CLS.VAL_SPLIT,
        is_train=False,
        classes=train_classes,
        crop_size=c.TEST_CROP_SIZE,
        resize=c.TEST_RESIZE,
    )
    return DataLoader(
        dataset,
        batch_size=cfg.TEST.CLS.IMS_PER_GPU,
        sampler=InferenceSampler(len(dataset)),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=collate_skipping_unreadable,
        pin_memory=torch.cuda.is_available(),
    )


def _list_classes(split_dir: str) -> List[str]:
    if not os.path.isdir(split_dir):
        raise ValueError(f"classification folder: split directory {split_dir!r} does not exist")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise ValueError(f"classification folder: {split_dir!r} has no class sub-folders")
    return classes


def count_train_images_and_classes(cfg: CfgNode) -> Tuple[int, int]:
    """(number of training images, number of classes) of the configured folder."""
    dataset = _train_dataset(cfg, resolve_dataset_root(cfg.DATASETS.CLS.ROOT))
    return len(dataset), len(dataset.classes)


def resolve_classes_and_batch(cfg: CfgNode, world_size: int, training: bool) -> None:
    """``MODEL.CLS.NUM_CLASSES`` from the training folder (when 0), and, for training, the batch,
    LR and iterations (:func:`scale_solver_to_actual_batch`); in place, on a mutable config."""
    if not training and cfg.MODEL.CLS.NUM_CLASSES != 0:
        return
    num_images, num_classes = count_train_images_and_classes(cfg)
    if cfg.MODEL.CLS.NUM_CLASSES == 0:
        cfg.MODEL.CLS.NUM_CLASSES = num_classes
    elif cfg.MODEL.CLS.NUM_CLASSES != num_classes:
        raise ValueError(
            f"MODEL.CLS.NUM_CLASSES is {cfg.MODEL.CLS.NUM_CLASSES} but the training folder of "
            f"{cfg.DATASETS.CLS.ROOT!r} has {num_classes} classes"
        )
    if training:
        scale_solver_to_actual_batch(cfg, world_size, num_images)
