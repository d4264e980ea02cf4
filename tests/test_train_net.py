"""train_net.py: set-up from file + command line, exact resume, the sem-seg loader, AMP on CUDA."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from detectron2.engine import default_argument_parser

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_net  # noqa: E402

SEM_SEG = str(REPO / "configs" / "Shapes" / "semantic_fpn_rednet26_fpn.yaml")
TINY = ("SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "DATASETS.TEST", "()")


def _args(*argv: str):
    return default_argument_parser().parse_args(list(argv))


def test_setup_merges_file_and_command_line(tmp_path):
    args = _args("--config-file", SEM_SEG, "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "7")
    cfg = train_net.setup(args)
    assert cfg.SOLVER.MAX_ITER == 7 and cfg.MODEL.REDNET.DEPTH == 26
    assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR"
    assert (tmp_path / "config.yaml").is_file()  # default_setup's copy of the full config
    assert cfg.is_frozen()


def test_launch_arguments_are_detectron2s():
    args = _args(
        "--config-file",
        SEM_SEG,
        "--num-gpus",
        "2",
        "--num-machines",
        "2",
        "--machine-rank",
        "1",
        "--dist-url",
        "tcp://127.0.0.1:12345",
        "--resume",
        "--eval-only",
    )
    assert (args.num_gpus, args.num_machines, args.machine_rank) == (2, 2, 1)
    assert args.dist_url == "tcp://127.0.0.1:12345" and args.resume and args.eval_only


FASTER_RCNN = str(REPO / "configs" / "Shapes" / "faster_rcnn_rednet26_fpn.yaml")
# Random multi-size resize + flip (+ the sem-seg crop), ROI/anchor sampling and SGD momentum all
# matter for the final weights; 6 iterations, checkpoint after the 3rd.
RESUME_OPTS = (
    "SOLVER.MAX_ITER",
    "6",
    "SOLVER.CHECKPOINT_PERIOD",
    "3",
    "SOLVER.STEPS",
    "(4,)",
    "INPUT.MIN_SIZE_TRAIN",
    "(48, 64)",
    "INPUT.MIN_SIZE_TRAIN_SAMPLING",
    "choice",
    "INPUT.MAX_SIZE_TRAIN",
    "80",
    "INPUT.CROP.SIZE",
    "(48, 48)",
) + TINY


def _resumed_equals_uninterrupted(tmp_path, config: str, workers_full: int, workers_resumed: int):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ("--config-file", config) + RESUME_OPTS
    train_net.main(
        _args(*common, "OUTPUT_DIR", str(full), "DATALOADER.NUM_WORKERS", str(workers_full))
    )
    # The run "killed" after iteration 3: only its checkpoint remains.
    resumed.mkdir()
    shutil.copy(full / "model_0000002.pth", resumed / "model_0000002.pth")
    (resumed / "last_checkpoint").write_text("model_0000002.pth")
    opts = ("OUTPUT_DIR", str(resumed), "DATALOADER.NUM_WORKERS", str(workers_resumed))
    train_net.main(_args("--resume", *common, *opts))
    a = torch.load(full / "model_final.pth", map_location="cpu", weights_only=False)
    b = torch.load(resumed / "model_final.pth", map_location="cpu", weights_only=False)
    assert a["iteration"] == b["iteration"] == 5
    assert a["model"].keys() == b["model"].keys()
    differing = [k for k, v in a["model"].items() if not torch.equal(v, b["model"][k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
    # metrics.json is written every 20 iterations and at the last (losses there are medians over
    # the run's own history, so only the LR compares).
    final = [_metrics(d)[-1] for d in (full, resumed)]
    assert final[0]["iteration"] == final[1]["iteration"] == 5
    assert final[0]["lr"] == final[1]["lr"]
    # The check has teeth: the checkpoint's weights differ from the final ones.
    ckpt = torch.load(full / "model_0000002.pth", map_location="cpu", weights_only=False)
    assert any(not torch.equal(v, a["model"][k]) for k, v in ckpt["model"].items())


def _metrics(output_dir: Path):
    lines = (output_dir / "metrics.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_resume_is_exact_for_semantic_segmentation(tmp_path):
    _resumed_equals_uninterrupted(tmp_path, SEM_SEG, workers_full=0, workers_resumed=0)


def test_resume_is_exact_for_detection_with_workers(tmp_path):
    """Faster R-CNN; the resumed run loads with a worker process, the full run without."""
    _resumed_equals_uninterrupted(tmp_path, FASTER_RCNN, workers_full=0, workers_resumed=1)


def test_resume_restores_optimizer_and_start_iteration(tmp_path):
    opts = ("OUTPUT_DIR", str(tmp_path), "SOLVER.CHECKPOINT_PERIOD", "1") + TINY
    train_net.main(_args("--config-file", SEM_SEG, "SOLVER.MAX_ITER", "2", *opts))
    cfg = train_net.setup(_args("--config-file", SEM_SEG, "SOLVER.MAX_ITER", "3", *opts))
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2 and trainer.train_loader.batches == 2
    # The optimizer's momentum comes back too (detectron2 v0.6 needs d2_involution.compat for it).
    saved = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    momentum = trainer.optimizer.state_dict()["state"]
    assert momentum and len(momentum) == len(saved["trainer"]["_trainer"]["optimizer"]["state"])
    for key, state in saved["trainer"]["_trainer"]["optimizer"]["state"].items():
        assert torch.equal(momentum[key]["momentum_buffer"], state["momentum_buffer"])
    fresh = train_net.Trainer(cfg)
    fresh.resume_or_load(resume=False)
    assert fresh.start_iter == 0 and fresh.train_loader.batches == 0


def test_sem_seg_train_loader_uses_crop_augmentation(tmp_path):
    cfg = train_net.setup(_args("--config-file", SEM_SEG, "OUTPUT_DIR", str(tmp_path), *TINY))
    batch = next(iter(train_net.Trainer.build_train_loader(cfg)))
    crop = tuple(cfg.INPUT.CROP.SIZE)
    assert len(batch) == 2
    for item in batch:
        assert tuple(item["image"].shape[1:]) == crop == tuple(item["sem_seg"].shape)
        assert set(item["sem_seg"].unique().tolist()) <= set(range(6)) | {255}


@pytest.mark.cuda
def test_amp_training_on_cuda(tmp_path):
    res = train_net.main(
        _args(
            "--config-file",
            SEM_SEG,
            "OUTPUT_DIR",
            str(tmp_path),
            "MODEL.DEVICE",
            "cuda",
            "MODEL.REDNET.NORM",
            "BN",
            "SOLVER.AMP.ENABLED",
            "True",
            "SOLVER.MAX_ITER",
            "3",
            *TINY,
        )
    )
    assert res == {} and (tmp_path / "model_final.pth").is_file()
