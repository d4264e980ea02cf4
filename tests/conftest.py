"""Shared test set-up: one generated copy of the built-in datasets for the whole test session.

``DETECTRON2_DATASETS`` points at ``<repo>/.cache/datasets`` (git-ignored) unless it is already set,
so every test and every test run reuses the shapes splits generated on first use.
"""

import os
from pathlib import Path
from typing import List

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DETECTRON2_DATASETS", str(REPO_ROOT / ".cache" / "datasets"))

# Before any test module imports detectron2: the compat fixes (e.g. the detectron2._C stand-in that
# detectron2.evaluation needs on the v0.6 fallback) and the dataset registrations.
import d2_involution  # noqa: E402,F401  # isort: skip


@pytest.fixture(scope="session")
def datasets_root() -> str:
    """The ``DETECTRON2_DATASETS`` folder the tests use."""
    return os.environ["DETECTRON2_DATASETS"]


def _dataset_dicts(name: str) -> List[dict]:
    from detectron2.data import DatasetCatalog

    import d2_involution  # noqa: F401  (registers the datasets, fixes detectron2 v0.6)

    return DatasetCatalog.get(name)


@pytest.fixture(scope="session")
def shapes_train_dicts() -> List[dict]:
    """Detectron2 dataset dicts of ``shapes_train`` (generated on first use)."""
    return _dataset_dicts("shapes_train")


@pytest.fixture(scope="session")
def shapes_val_dicts() -> List[dict]:
    """Detectron2 dataset dicts of ``shapes_val`` (generated on first use)."""
    return _dataset_dicts("shapes_val")


@pytest.fixture(scope="session")
def shapes_sem_seg_val_dicts() -> List[dict]:
    """Detectron2 dataset dicts of ``shapes_sem_seg_val`` (generated on first use)."""
    return _dataset_dicts("shapes_sem_seg_val")


@pytest.fixture(scope="session")
def shapes_classification_root(datasets_root: str) -> str:
    """A small ImageNet-style shapes folder (20 train / 5 val images per class, 64 px)."""
    from d2_involution.data import generate_shapes_classification

    root = os.path.join(datasets_root, "shapes", "classification_tests")
    return generate_shapes_classification(
        root, num_train_per_class=20, num_val_per_class=5, image_size=64, seed=0
    )
