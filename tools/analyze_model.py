#!/usr/bin/env python
"""Parameters, FLOPs and activations of d2_involution models, as a markdown table.

    # detectors / segmentors, at the input size the official numbers use (mmdet 800x1280,
    # mmseg 1024x2048), split into backbone, neck and heads:
    python tools/analyze_model.py --config-file configs/COCO-Detection/*.yaml
    # the ImageNet classifiers at 224x224 (paper: 1.73/2.22/2.71/4.74/6.79 GFLOPs):
    python tools/analyze_model.py --backbone-only --depths 26 38 50 101 152

FLOPs are fvcore's: one multiply-add counts as one FLOP (as mmcv's counter the paper used), the
involution op through its FLOP handle (K*K multiply-adds per output element), norms and
element-wise ops as fvcore counts them. Detectors are analysed in inference mode with
``ROI_HEADS.SCORE_THRESH_TEST 0`` so that the mask head always sees ``TEST.DETECTIONS_PER_IMAGE``
(100) boxes, like mmdet's ``get_flops`` (which feeds 1000 boxes to the box head and 100 to the mask
head); the RPN here keeps at most ``RPN.POST_NMS_TOPK_TEST`` (1000) proposals.
"""

import d2_involution  # isort: skip  # noqa: F401  (first: detectron2 compat + registrations)
import argparse
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from fvcore.nn import ActivationCountAnalysis, FlopCountAnalysis
from torch import nn

from d2_involution import add_involution_config
from d2_involution.classification import RedNetClassifier
from d2_involution.modeling import build_rednet
from d2_involution.ops.flops import add_involution_flop_handles

# Input (H, W) by meta-architecture: mmdet's get_flops default 1280x800, mmseg's 2048x1024.
DEFAULT_INPUT_SIZE = {"SemanticSegmentor": (1024, 2048)}
DETECTION_INPUT_SIZE = (800, 1280)
PAPER_GFLOPS = {26: 1.73, 38: 2.22, 50: 2.71, 101: 4.74, 152: 6.79}
PAPER_PARAMS_M = {26: 9.23, 38: 12.39, 50: 15.54, 101: 25.65, 152: 33.99}


class TensorInOut(nn.Module):
    """A Detectron2 model as tensor in, tuple of tensors out, so that fvcore can trace it.

    (``detectron2.utils.analysis`` does the same, but on detectron2 v0.6 it imports caffe2.)
    The wrapped model is the attribute ``model``: module names gain a ``model.`` prefix.
    """

    def __init__(self, model: nn.Module, height: int, width: int):
        super().__init__()
        self.model = model
        self.height = height
        self.width = width

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        out = self.model([{"image": image, "height": self.height, "width": self.width}])[0]
        tensors: List[torch.Tensor] = []
        if "sem_seg" in out:
            tensors.append(out["sem_seg"])
        if "instances" in out:
            inst = out["instances"]
            tensors.extend([inst.pred_boxes.tensor, inst.scores, inst.pred_classes])
            if inst.has("pred_masks"):
                tensors.append(inst.pred_masks)
        return tuple(tensors)


def setup_cfg(config_file: str, opts: Sequence[str]) -> CfgNode:
    cfg = get_cfg()
    add_involution_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    # SyncBN needs a process group; the counts are the same with BN.
    for node in (cfg.MODEL.REDNET, cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.FPN):
        if node.get("NORM", "") == "SyncBN":
            node.NORM = "BN"
    cfg.freeze()
    return cfg


def _part_totals(totals: Dict[str, int], model: nn.Module) -> Dict[str, int]:
    """Backbone (bottom-up), neck (FPN, when there is one) and heads, from per-module totals."""
    names = {name for name, _ in model.named_modules()}
    out: Dict[str, int] = {}
    if "backbone.bottom_up" in names:
        out["backbone"] = totals.get("backbone.bottom_up", 0)
        out["neck"] = totals.get("backbone", 0) - out["backbone"]
    else:
        out["backbone"] = totals.get("backbone", 0)
        out["neck"] = 0
    out["heads"] = sum(totals.get(n, 0) for n in ("proposal_generator", "roi_heads", "head"))
    out["heads"] += totals.get("sem_seg_head", 0)
    return out


def _strip_prefix(totals: Dict[str, int], prefix: str) -> Dict[str, int]:
    out = {}
    for name, value in totals.items():
        if name == prefix:
            out[""] = value
        elif name.startswith(prefix + "."):
            out[name[len(prefix) + 1 :]] = value
    return out


def _param_totals(model: nn.Module) -> Dict[str, int]:
    totals = {"": sum(p.numel() for p in model.parameters())}
    for name, module in model.named_modules():
        if name:
            totals[name] = sum(p.numel() for p in module.parameters())
    return totals


def analyze_config(
    config_file: str, opts: Sequence[str] = (), input_size: Optional[Tuple[int, int]] = None
) -> Dict[str, object]:
    """Parameters, FLOPs and activations of one config's model on one (H, W) image."""
    cfg = setup_cfg(config_file, opts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if input_size is None:
        input_size = DEFAULT_INPUT_SIZE.get(cfg.MODEL.META_ARCHITECTURE, DETECTION_INPUT_SIZE)
    h, w = input_size
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 255
    wrapper = TensorInOut(model, h, w)
    with torch.no_grad():
        flops = FlopCountAnalysis(wrapper, (image,))
        add_involution_flop_handles(flops)
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        flop_totals = _strip_prefix(flops.by_module(), "model")
        activations = ActivationCountAnalysis(wrapper, (image,))
        activations.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total_activations = activations.total()
    params = _param_totals(model)
    return {
        "name": config_file,
        "input": f"{h}x{w}",
        "params": params[""],
        "params_parts": _part_totals(params, model),
        "flops": flop_totals[""],
        "flops_parts": _part_totals(flop_totals, model),
        "activations": total_activations,
    }


def analyze_classifier(depth: int, size: int = 224) -> Dict[str, object]:
    """Parameters, FLOPs and activations of the ImageNet RedNet-``depth`` on a size x size image."""
    torch.manual_seed(0)
    # The ImageNet classifier the paper measures: stem involution 3x3, GAP, fc 2048 -> 1000.
    model = RedNetClassifier(build_rednet(depth, stem_involution_kernel=3), 1000).eval()
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        flops = FlopCountAnalysis(model, x)
        add_involution_flop_handles(flops)
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        activations = ActivationCountAnalysis(model, x)
        activations.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return {
            "name": f"RedNet-{depth}",
            "input": f"{size}x{size}",
            "params": sum(p.numel() for p in model.parameters()),
            "flops": flops.total(),
            "activations": activations.total(),
        }


def classifier_table(rows: List[Dict[str, object]]) -> str:
    lines = [
        "| Model | Input | Params (M) | paper Params (M) | GFLOPs | paper GFLOPs "
        "| Activations (M) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        depth = int(str(r["name"]).split("-")[1])
        lines.append(
            f"| {r['name']} | {r['input']} | {r['params'] / 1e6:.2f} | {PAPER_PARAMS_M[depth]:.2f} "
            f"| {r['flops'] / 1e9:.2f} | {PAPER_GFLOPS[depth]:.2f} | {r['activations'] / 1e6:.1f} |"
        )
    return "\n".join(lines)


def config_table(rows: List[Dict[str, object]]) -> str:
    lines = [
        "| Config | Input | Params (M) | backbone / neck / heads (M) | GFLOPs "
        "| backbone / neck / heads (G) | Activations (M) |",
        "|---|---|---:|---|---:|---|---:|",
    ]
    for r in rows:
        pp, fp = r["params_parts"], r["flops_parts"]
        lines.append(
            f"| {r['name']} | {r['input']} | {r['params'] / 1e6:.2f} "
            f"| {pp['backbone'] / 1e6:.2f} / {pp['neck'] / 1e6:.2f} / {pp['heads'] / 1e6:.2f} "
            f"| {r['flops'] / 1e9:.1f} "
            f"| {fp['backbone'] / 1e9:.1f} / {fp['neck'] / 1e9:.1f} / {fp['heads'] / 1e9:.1f} "
            f"| {r['activations'] / 1e6:.1f} |"
        )
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", nargs="*", default=[], metavar="FILE")
    parser.add_argument(
        "--backbone-only",
        action="store_true",
        help="analyse the ImageNet RedNet classifiers (--depths) at 224x224",
    )
    parser.add_argument("--depths", type=int, nargs="+", default=[26, 38, 50, 101, 152])
    parser.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="image size for --config-file (default: 800 1280 detection, 1024 2048 segmentation)",
    )
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Analyse what the arguments name; prints and returns the markdown table(s)."""
    args = get_parser().parse_args(argv)
    if not args.backbone_only and not args.config_file:
        raise ValueError("give --config-file FILE [FILE ...] and/or --backbone-only")
    for depth in args.depths:
        if depth not in PAPER_GFLOPS:
            raise ValueError(f"--depths: expected values in {sorted(PAPER_GFLOPS)}, got {depth}")
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    logging.getLogger("detectron2").setLevel(logging.ERROR)
    tables = []
    if args.backbone_only:
        tables.append(classifier_table([analyze_classifier(d) for d in args.depths]))
    if args.config_file:
        size = tuple(args.input_size) if args.input_size else None
        rows = [analyze_config(f, args.opts, size) for f in args.config_file]
        tables.append(config_table(rows))
    text = "\n\n".join(tables)
    print(text)
    return text


if __name__ == "__main__":
    main()
