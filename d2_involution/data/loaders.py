"""Detection/segmentation data loaders that resume exactly and survive bad images.

Detectron2's ``build_detection_train_loader`` draws its order from a ``TrainingSampler`` that starts
its random stream anew on every (re)start, and its mappers draw augmentations from the global
``random``/``numpy`` state of whichever process runs them. A resumed run therefore sees other
batches than the run it continues. Here both are functions of ``(seed, stream position)`` only:

* :class:`ResumableBatchSampler` yields the global batch ``b`` (all ranks together) as a pure
  function of ``(seed, b)``: per epoch a seeded permutation, split by aspect-ratio group when
  ``DATALOADER.ASPECT_RATIO_GROUPING`` is on (Detectron2's grouping: width > height or not), cut
  into full batches, whose order is shuffled with the same seed. Rank ``r`` takes its slice of each.
* :class:`PositionSeededMapper` seeds ``random``, ``numpy`` and ``torch`` from ``(seed, position)``
  around each mapper call (and restores them), so augmentation does not depend on the process or
  the number of workers: ``DATALOADER.NUM_WORKERS > 0`` is exact too.
* :class:`ResumableTrainLoader` counts the batches it has handed out; its ``state_dict()`` goes
  into the checkpoint and a resume starts the sampler at that batch.

Unreadable images (missing, truncated, not an image: ``OSError``/``SyntaxError`` from the mapper's
read) are skipped with a warning naming the file and counted (``num_skipped``); a batch whose
images are all bad is dropped. When every image of the dataset has failed in a row the loader
stops with an error naming the dataset. The test loader does the same, image by image.
"""

import itertools
import logging
import random
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper, get_detection_dataset_dicts
from detectron2.data.samplers import InferenceSampler
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "PositionSeededMapper",
    "ResumableBatchSampler",
    "ResumableTrainLoader",
    "SkippingTestLoader",
    "build_resumable_train_loader",
    "build_skipping_test_loader",
    "global_rng_state",
    "set_global_rng_state",
]

logger = logging.getLogger(__name__)

#: What reading a broken image raises: missing file (FileNotFoundError), truncated or undecodable
#: data (OSError, PIL's UnidentifiedImageError), a corrupt PNG chunk (SyntaxError from PIL).
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError)
Key = Tuple[int, int]  # (index into the dataset, position in the sample stream)


class Skipped:
    """What a mapper returns for an image it cannot read: the file and the reason."""

    def __init__(self, file_name: str, reason: str):
        self.file_name, self.reason = file_name, reason


def map_or_skip(mapper: Callable[[dict], Any], dataset_dict: dict) -> Any:
    """``mapper(dataset_dict)``, or a :class:`Skipped` (with a warning) when its image is bad."""
    try:
        return mapper(dict(dataset_dict))
    except UNREADABLE_IMAGE_ERRORS as e:
        name = dataset_dict.get("file_name", "<no file_name>")
        logger.warning(f"Skipping unreadable image {name}: {type(e).__name__}: {e}")
        return Skipped(name, f"{type(e).__name__}: {e}")


@contextmanager
def _seeded_rngs(seed: int) -> Iterator[None]:
    """``random``, ``numpy`` and torch's CPU generator seeded with ``seed``; restored after (CUDA
    generators are left alone)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def global_rng_state() -> Dict[str, Any]:
    """The global random states a training step draws from (torch CPU/CUDA, numpy, random), as
    tensors and plain values, which ``torch.load(weights_only=True)`` reads back."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "random": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`global_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["random"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def position_seed(seed: int, position: int) -> int:
    """One 63-bit seed per (run seed, stream position), well spread by numpy's SeedSequence."""
    return int(
        np.random.SeedSequence([seed % 2**63, position]).generate_state(1, np.uint64)[0] >> 1
    )


class PositionSeededMapper(Dataset):
    """``dataset[(index, position)]`` = ``mapper(dicts[index])`` under RNGs seeded by position.

    Returns a :class:`Skipped` for an unreadable image (see :func:`map_or_skip`).
    """

    def __init__(self, dataset_dicts: Sequence[dict], mapper: Callable[[dict], Any], seed: int):
        self.dataset_dicts, self.mapper, self.seed = dataset_dicts, mapper, int(seed)

    def __len__(self) -> int:
        return len(self.dataset_dicts)

    def __getitem__(self, key: Key) -> Any:
        index, position = key
        with _seeded_rngs(position_seed(self.seed, position)):
            return map_or_skip(self.mapper, self.dataset_dicts[index])


def aspect_ratio_groups(dataset_dicts: Sequence[dict]) -> List[int]:
    """Detectron2's grouping: 1 for images wider than tall, else 0 (all 0 without sizes)."""
    return [int(d.get("width", 0) > d.get("height", 0)) for d in dataset_dicts]


class ResumableBatchSampler(Sampler):
    """An endless stream of this rank's batches of ``(index, position)``, starting at ``start``.

    Global batch ``b`` (``batch_size * world_size`` images) is in epoch ``b // batches_per_epoch``;
    an epoch is a permutation drawn from ``(seed, epoch)``, split by ``groups``, cut into full
    global batches (the remainder of each group is left out of that epoch) and shuffled. An
    image's position is ``epoch * len(groups) + its place in the permutation``.
    """

    def __init__(
        self,
        groups: Sequence[int],
        batch_size: int,
        seed: int,
        *,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.groups = np.asarray(groups, dtype=np.int64)
        self.batch_size, self.seed, self.start = batch_size, int(seed), start
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        counts = np.bincount(self.groups) if len(self.groups) else np.zeros(1, np.int64)
        self.batches_per_epoch = int(sum(c // self.global_batch for c in counts))
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the training set ({len(self.groups)} images, aspect-ratio groups of "
                f"{counts.tolist()}) holds no full batch of {self.global_batch} images "
                "(SOLVER.IMS_PER_BATCH)"
            )

    def epoch_batches(self, epoch: int) -> List[List[Key]]:
        """The global batches of one epoch, as lists of (index, position)."""
        generator = torch.Generator()
        generator.manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.groups), generator=generator).tolist()
        offset = epoch * len(self.groups)
        batches: List[List[Key]] = []
        for group in np.unique(self.groups):
            places = [p for p, i in enumerate(perm) if self.groups[i] == group]
            for s in range(0, len(places) - self.global_batch + 1, self.global_batch):
                chunk = places[s : s + self.global_batch]
                batches.append([(perm[p], offset + p) for p in chunk])
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in order]

    def __iter__(self) -> Iterator[List[Key]]:
        epoch, first = divmod(self.start, self.batches_per_epoch)
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for e in itertools.count(epoch):
            for batch in self.epoch_batches(e)[first:]:
                yield batch[lo:hi]
            first = 0


def collate_skipping(items: List[Any]) -> Tuple[List[Any], List[Skipped]]:
    """(the readable samples as a list, the skipped ones)."""
    return [x for x in items if not isinstance(x, Skipped)], [
        x for x in items if isinstance(x, Skipped)
    ]


class ResumableTrainLoader:
    """This process's training batches (lists of mapped dicts), resumable and skipping bad images.

    ``state_dict()`` = ``{"seed", "batches"}`` (global batches handed out so far, dropped ones
    included); ``load_state_dict`` before iterating makes the stream continue from there.
    ``num_skipped`` counts the unreadable images seen by this process.
    """

    def __init__(
        self,
        dataset_dicts: Sequence[dict],
        mapper: Callable[[dict], Any],
        batch_size: int,
        *,
        seed: int,
        aspect_ratio_grouping: bool = True,
        num_workers: int = 0,
        dataset_name: str = "the training set",
    ):
        self.dataset_dicts, self.mapper = dataset_dicts, mapper
        self.batch_size, self.seed = batch_size, int(seed)
        self.aspect_ratio_grouping, self.num_workers = aspect_ratio_grouping, num_workers
        self.dataset_name = dataset_name
        self.batches = 0
        self.num_skipped = 0
        self._skipped_in_a_row = 0

    def state_dict(self) -> Dict[str, int]:
        return {"seed": self.seed, "batches": self.batches}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.seed, self.batches = int(state["seed"]), int(state["batches"])

    def _data_loader(self) -> DataLoader:
        dicts = self.dataset_dicts
        groups = aspect_ratio_groups(dicts) if self.aspect_ratio_grouping else [0] * len(dicts)
        sampler = ResumableBatchSampler(
            groups,
            self.batch_size,
            self.seed,
            start=self.batches,
            rank=comm.get_rank(),
            world_size=comm.get_world_size(),
        )
        # Its own generator: the DataLoader draws its workers' base seed from it, not from the
        # global torch RNG that the model's sampling draws from (and the checkpoint restores).
        return DataLoader(
            PositionSeededMapper(dicts, self.mapper, self.seed),
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_skipping,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _count(self, good: List[Any], skipped: List[Skipped]) -> None:
        self.num_skipped += len(skipped)
        self._skipped_in_a_row = 0 if good else self._skipped_in_a_row + len(skipped)
        if self._skipped_in_a_row >= len(self.dataset_dicts):
            raise RuntimeError(
                f"{self.dataset_name}: {self._skipped_in_a_row} images in a row could not be read "
                f"(the dataset has {len(self.dataset_dicts)}); e.g. {skipped[0].file_name}: "
                f"{skipped[0].reason}. Check DATASETS.TRAIN and the image folder."
            )

    def __iter__(self) -> Iterator[List[Any]]:
        logger.info(
            f"Training data: {len(self.dataset_dicts)} images from {self.dataset_name}, from "
            f"batch {self.batches} (seed {self.seed}, {self.num_workers} workers)"
        )
        for good, skipped in self._data_loader():
            self.batches += 1
            self._count(good, skipped)
            if good:
                yield good


def _resolve_seed(cfg: CfgNode) -> int:
    return cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()


def build_resumable_train_loader(
    cfg: CfgNode, mapper: Optional[Callable[[dict], Any]] = None
) -> ResumableTrainLoader:
    """The training loader of ``cfg`` (``DATASETS.TRAIN``, ``SOLVER.IMS_PER_BATCH``,
    ``DATALOADER``), with Detectron2's ``DatasetMapper(cfg, True)`` unless ``mapper`` is given.

    ``DATALOADER.SAMPLER_TRAIN`` must be ``TrainingSampler`` (the others are refused: their order
    is not resumable here).
    """
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ValueError(
            "DATALOADER.SAMPLER_TRAIN: the resumable loader supports 'TrainingSampler', got "
            f"{cfg.DATALOADER.SAMPLER_TRAIN!r}"
        )
    world_size = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be divisible by the number of "
            f"processes ({world_size})"
        )
    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(
            cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
        ),
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    return ResumableTrainLoader(
        dicts,
        mapper if mapper is not None else DatasetMapper(cfg, True),
        cfg.SOLVER.IMS_PER_BATCH // world_size,
        seed=_resolve_seed(cfg),
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        dataset_name=", ".join(cfg.DATASETS.TRAIN),
    )


class _MappedOrSkipped(Dataset):
    def __init__(self, dataset_dicts: Sequence[dict], mapper: Callable[[dict], Any]):
        self.dataset_dicts, self.mapper = dataset_dicts, mapper

    def __len__(self) -> int:
        return len(self.dataset_dicts)

    def __getitem__(self, index: int) -> Any:
        return map_or_skip(self.mapper, self.dataset_dicts[index])


class SkippingTestLoader:
    """Detectron2's test loading (``InferenceSampler``, batch 1) minus the unreadable images.

    ``len()`` is the number of images of this process's share; ``num_skipped`` those skipped.
    Their annotations stay in the evaluator's ground truth (COCO counts them as missed).
    """

    def __init__(self, dataset_dicts: Sequence[dict], mapper: Callable[[dict], Any], num_workers=0):
        self._loader = DataLoader(
            _MappedOrSkipped(dataset_dicts, mapper),
            batch_size=1,
            sampler=InferenceSampler(len(dataset_dicts)),
            num_workers=num_workers,
            collate_fn=collate_skipping,
            generator=torch.Generator(),  # evaluating leaves the global RNG as it was
        )
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[List[Any]]:
        for good, skipped in self._loader:
            self.num_skipped += len(skipped)
            if good:
                yield good
        if self.num_skipped:
            logger.warning(f"Evaluation skipped {self.num_skipped} unreadable images")


def build_skipping_test_loader(
    cfg: CfgNode, dataset_name: str, mapper: Optional[Callable[[dict], Any]] = None
) -> SkippingTestLoader:
    """The test loader of ``dataset_name`` with ``DatasetMapper(cfg, False)`` unless ``mapper``."""
    dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
    return SkippingTestLoader(
        dicts,
        mapper if mapper is not None else DatasetMapper(cfg, False),
        cfg.DATALOADER.NUM_WORKERS,
    )
