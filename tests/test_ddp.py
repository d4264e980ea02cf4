"""Two processes (gloo, CPU) compute the gradients one process computes on the union batch.

Detectron2 v0.6's ``launch`` asserts CUDA, so the two workers are started with
``torch.multiprocessing`` and a gloo process group, and each wraps its model with Detectron2's
``create_ddp_model`` (``DistributedDataParallel``), as ``launch`` + ``DefaultTrainer`` do on GPUs:

* the classification trainer's step (``AccumulatingTrainer.run_step``) on a RedNet-26
  classifier, 2 images per process;
* one training step of the Shapes Faster R-CNN (RedNet-26 FPN), 1 image per process.

Norm choice: FrozenStatsBN (the detectors' default; statistics fixed, affine weights train), so
a sample's gradient does not depend on the other samples of its process (BN/SyncBN differ here:
BN by design, SyncBN only in summation order). For the detector, RPN and ROI sampling take every
candidate (batch sizes per image above the candidate counts: no random subsampling) and both
images have the same number of objects, so the per-process loss normalisations agree with the
single-process ones. The largest gradient difference is printed (``-s`` shows it).
"""

import d2_involution  # isort: skip  # noqa: F401  (first, also in the spawned workers: compat)
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper
from detectron2.engine import create_ddp_model
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from random_weights import randomize_norms

from d2_involution import add_involution_config
from d2_involution.classification import AccumulatingTrainer, RedNetClassifier
from d2_involution.modeling import build_rednet

REPO = Path(__file__).resolve().parents[1]
FASTER_RCNN = REPO / "configs" / "Shapes" / "faster_rcnn_rednet26_fpn.yaml"
WORLD_SIZE = 2
DETECTOR_OPTS = [
    "MODEL.REDNET.NORM", "FrozenStatsBN",
    "MODEL.BACKBONE.FREEZE_AT", "0",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "100000",
    "MODEL.RPN.NMS_THRESH", "1.0",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "100000",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "64",
]  # fmt: skip


def classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    net = RedNetClassifier(build_rednet(26, stem_involution_kernel=3, norm="FrozenStatsBN"), 5)
    return randomize_norms(net).train()


def detector() -> torch.nn.Module:
    cfg = add_involution_config(get_cfg())
    cfg.merge_from_file(str(FASTER_RCNN))
    cfg.merge_from_list(DETECTOR_OPTS)
    torch.manual_seed(0)
    return randomize_norms(build_model(cfg)).train()


def classifier_grads(model: torch.nn.Module, batch: dict) -> dict:
    """The gradients after one ``AccumulatingTrainer`` step (LR 0: the weights stay)."""
    trainer = AccumulatingTrainer(model, [batch], torch.optim.SGD(model.parameters(), lr=0.0))
    with EventStorage(0) as storage:
        trainer.storage, trainer.iter = storage, 0
        trainer.run_step()
    return _grads(model)


def detector_grads(model: torch.nn.Module, images: list) -> dict:
    with EventStorage(0):
        losses = model(images)
    sum(losses.values()).backward()
    return _grads(model)


def _grads(model: torch.nn.Module) -> dict:
    module = getattr(model, "module", model)
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _worker(rank: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", world_size=WORLD_SIZE, rank=rank)
    torch.set_num_threads(1)
    data = torch.load(os.path.join(folder, "data.pt"), weights_only=False)
    half = {k: v[2 * rank : 2 * rank + 2] for k, v in data["classification"].items()}
    results = {
        "classifier": classifier_grads(create_ddp_model(classifier(), device_ids=None), half),
        "detector": detector_grads(
            create_ddp_model(detector(), device_ids=None), data["detection"][rank : rank + 1]
        ),
    }
    if rank == 0:
        torch.save(results, os.path.join(folder, "ddp.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _detection_batch(shapes_train_dicts) -> list:
    """Two mapped training images with the same number of objects (no flip: fixed seed)."""
    cfg = add_involution_config(get_cfg())
    cfg.merge_from_file(str(FASTER_RCNN))
    cfg.merge_from_list(DETECTOR_OPTS + ["INPUT.RANDOM_FLIP", "none"])
    mapper = DatasetMapper(cfg, is_train=True)
    first = shapes_train_dicts[0]
    second = next(
        d for d in shapes_train_dicts[1:] if len(d["annotations"]) == len(first["annotations"])
    )
    return [mapper(dict(first)), mapper(dict(second))]


@pytest.fixture(scope="module")
def gradients(tmp_path_factory, shapes_train_dicts):
    folder = tmp_path_factory.mktemp("ddp")
    g = torch.Generator().manual_seed(0)
    data = {
        "classification": {
            "image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g),
            "label": torch.tensor([0, 3, 1, 4]),
        },
        "detection": _detection_batch(shapes_train_dicts),
    }
    torch.save(data, folder / "data.pt")
    mp.start_processes(
        _worker, args=(_free_port(), str(folder)), nprocs=WORLD_SIZE, start_method="spawn"
    )
    ddp = torch.load(folder / "ddp.pt", weights_only=False)
    single = {
        "classifier": classifier_grads(classifier(), data["classification"]),
        "detector": detector_grads(detector(), data["detection"]),
    }
    return ddp, single


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) > 50
    assert sum(int(g.abs().sum() > 0) for g in b.values()) > 0.9 * len(b)  # gradients that matter
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("model", ["classifier", "detector"])
def test_two_process_gradients_equal_one_process_on_union_batch(gradients, model):
    ddp, single = gradients
    difference = _max_difference(ddp[model], single[model])
    scale = max(float(g.abs().max()) for g in single[model].values())
    print(f"{model}: max |grad(2 processes) - grad(1 process)| = {difference:.3g} (of {scale:.3g})")
    assert difference <= 1e-5 * scale + 1e-7
