"""Shared test set-up: one generated copy of the built-in datasets for the whole test session, the
``cuda`` marker, and a torch-only mode.

``DETECTRON2_DATASETS`` points at ``<repo>/.cache/datasets`` (git-ignored) unless it is already set,
so every test and every test run reuses the shapes splits generated on first use.

Tests marked ``@pytest.mark.cuda`` are skipped without a CUDA device (tools/gpu_check.sh selects
them with ``-m cuda`` on a GPU machine).

Without detectron2 only the op and layer tests (``STANDALONE``: they need torch, pytest and, on
a GPU, CuPy) are collected; every other test module is reported as skipped, with the reason.
"""

import os
from pathlib import Path
from typing import List

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DETECTRON2_DATASETS", str(REPO_ROOT / ".cache" / "datasets"))
STANDALONE = {
    "test_involution_layer.py",
    "test_ops_cuda.py",
    "test_ops_cuda_emulated.py",
    "test_ops_cuda_host.py",
    "test_ops_involution.py",
    "test_ops_standalone.py",
}

try:
    import detectron2  # noqa: F401

    HAS_DETECTRON2 = True
except ModuleNotFoundError as e:
    if e.name != "detectron2":
        raise
    HAS_DETECTRON2 = False

# Before any test module imports detectron2: the compat fixes (e.g. the detectron2._C stand-in that
# detectron2.evaluation needs on the v0.6 fallback) and the dataset registrations (without
# detectron2: nothing but the package's parent module, see d2_involution/__init__.py).
import d2_involution  # noqa: E402,F401  # isort: skip


class _NeedsDetectron2(pytest.File):
    """A test module that cannot be imported without detectron2: one skipped item."""

    def collect(self):
        pytest.skip(f"{self.path.name} needs detectron2, which is not installed")


def pytest_pycollect_makemodule(module_path: Path, parent):
    if HAS_DETECTRON2 or module_path.name in STANDALONE:
        return None
    return _NeedsDetectron2.from_parent(parent, path=module_path)


def pytest_collection_modifyitems(config, items) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's small models: on 2 shared cores, 2 threads spinning
    against other jobs ran them several times slower (request with ``usefixtures``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: The CI version of the shapes pre-training recipe: configs/Shapes-Classification/rednet26.yaml
#: shortened to half its iterations (about 2.3 min on one core instead of 4.6).
SHORT_PRETRAINING = """_BASE_: "{recipe}"
SOLVER:
  MAX_ITER: 450
TEST:
  EVAL_PERIOD: 0
"""


@pytest.fixture(scope="session", autouse=True)
def short_shapes_pretraining(tmp_path_factory):
    """``MODEL.WEIGHTS shapes-pretrained://rednet26`` resolves to :data:`SHORT_PRETRAINING`, so
    the tests that load it (semantic Shapes configs) pre-train once per cache in CI's budget; it is
    cached under ``DETECTRON2_DATASETS`` with its own recipe hash, apart from the full recipe's."""
    if not HAS_DETECTRON2:
        yield
        return
    from d2_involution.classification import shapes_pretrained

    folder = tmp_path_factory.mktemp("recipes")
    recipe = REPO_ROOT / "configs" / "Shapes-Classification" / "rednet26.yaml"
    (folder / "rednet26.yaml").write_text(SHORT_PRETRAINING.format(recipe=recipe))
    original = shapes_pretrained.RECIPE_DIR
    shapes_pretrained.RECIPE_DIR = folder
    yield
    shapes_pretrained.RECIPE_DIR = original
