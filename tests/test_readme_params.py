"""The README's parameter table, row by row: each config built, its parameters counted.

Classifiers must match exactly (the README also lists their exact official counts); detectors
and segmenters within 0.01 M of the printed value. Counted as tools/analyze_model.py counts:
``sum(p.numel() for p in model.parameters())`` of the model the config builds (frozen BatchNorms
are buffers; SyncBN counted as BN, which has the same parameters).
"""

import re
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model

from d2_involution import add_involution_config
from d2_involution.classification import get_cls_cfg

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
ROW = re.compile(r"^\| `(?P<config>[\w\-/]+\.yaml)` \| (?P<ours>[\d.]+) / [\d.]+ \|", re.M)


def _rows() -> List[Tuple[str, float]]:
    return [(m["config"], float(m["ours"])) for m in ROW.finditer(README)]


def _exact_classifier_counts() -> Dict[int, int]:
    """The sentence "The classifiers' parameter counts equal ... exactly (9,233,166 / ...)"."""
    sentence = re.search(r"classifiers' parameter counts equal.*?\(([\d, /\n]+)\)", README, re.S)
    counts = [int(c.replace(",", "")) for c in re.split(r"\s*/\s*", sentence.group(1).strip())]
    return dict(zip((26, 38, 50, 101, 152), counts))


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _detectron2_cfg(config: str) -> CfgNode:
    from detectron2.config import get_cfg

    cfg = add_involution_config(get_cfg())
    cfg.merge_from_file(str(REPO / "configs" / config))
    cfg.MODEL.DEVICE = "cpu"
    for node in (cfg.MODEL.REDNET, cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.FPN):
        if node.get("NORM", "") == "SyncBN":
            node.NORM = "BN"
    return cfg


def test_table_lists_the_paper_configs():
    rows = dict(_rows())
    assert len(rows) == 16
    assert sum(c.startswith("ImageNet-Classification/") for c in rows) == 5
    assert all((REPO / "configs" / c).is_file() for c in rows)
    assert sorted(_exact_classifier_counts()) == [26, 38, 50, 101, 152]


@pytest.mark.parametrize("config,printed", [r for r in _rows() if r[0].startswith("ImageNet")])
def test_classifier_params_are_exact(config, printed):
    cfg = get_cls_cfg()
    cfg.merge_from_file(str(REPO / "configs" / config))
    cfg.MODEL.DEVICE = "cpu"
    count = _count(build_model(cfg))
    assert count == _exact_classifier_counts()[cfg.MODEL.REDNET.DEPTH]
    assert round(count / 1e6, 2) == printed


@pytest.mark.parametrize("config,printed", [r for r in _rows() if not r[0].startswith("ImageNet")])
def test_detector_params_within_printed_precision(config, printed):
    count = _count(build_model(_detectron2_cfg(config)))
    assert abs(count / 1e6 - printed) <= 0.01, f"{config}: {count / 1e6:.4f} M, README {printed}"
