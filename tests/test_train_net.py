"""train_net.py: set-up from file + command line, resume, the sem-seg loader, AMP on CUDA."""

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


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    opts = ("OUTPUT_DIR", str(tmp_path), "SOLVER.CHECKPOINT_PERIOD", "1") + TINY
    train_net.main(_args("--config-file", SEM_SEG, "SOLVER.MAX_ITER", "2", *opts))
    assert (tmp_path / "model_final.pth").is_file()
    cfg = train_net.setup(_args("--config-file", SEM_SEG, "SOLVER.MAX_ITER", "3", *opts))
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2
    # The optimizer's momentum comes back too (detectron2 v0.6 needs d2_involution.compat for it).
    saved = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    momentum = trainer.optimizer.state_dict()["state"]
    assert momentum and len(momentum) == len(saved["trainer"]["_trainer"]["optimizer"]["state"])
    for key, state in saved["trainer"]["_trainer"]["optimizer"]["state"].items():
        assert torch.equal(momentum[key]["momentum_buffer"], state["momentum_buffer"])
    fresh = train_net.Trainer(cfg)
    fresh.resume_or_load(resume=False)
    assert fresh.start_iter == 0


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
