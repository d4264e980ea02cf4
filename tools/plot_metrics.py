#!/usr/bin/env python
"""Plot a training run from Detectron2's ``metrics.json``: the losses, and the validation metric.

    python tools/plot_metrics.py output/shapes/mask_rcnn_rednet26_fpn/metrics.json \\
        --output docs/shapes_training_curve.png

Left: ``total_loss`` (and the other ``loss_*`` scalars with ``--all-losses``) at every logged
iteration. Right: the evaluation results written by periodic evaluation (``TEST.EVAL_PERIOD``) and
the final evaluation; by default every ``*/AP``, ``*/mIoU`` and ``*/top1`` key found, or the keys
given with ``--metrics``. A resumed run's repeated iterations keep their last value.
"""

import argparse
import json
import math
from typing import Dict, List, Optional, Sequence

DEFAULT_METRIC_SUFFIXES = ("/AP", "/mIoU", "/top1")


def read_metrics(path: str) -> Dict[int, Dict[str, float]]:
    """``{iteration: {key: value}}`` from a metrics.json (one JSON object per line)."""
    by_iteration: Dict[int, Dict[str, float]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{number}: not a JSON object ({e})") from None
            if "iteration" not in record:
                raise ValueError(f"{path}:{number}: no 'iteration' key")
            by_iteration.setdefault(int(record.pop("iteration")), {}).update(record)
    if not by_iteration:
        raise ValueError(f"{path}: no metrics")
    return by_iteration


def series(by_iteration: Dict[int, Dict[str, float]], key: str) -> List[tuple]:
    """Sorted (iteration, value) pairs of ``key``, NaN values left out."""
    return [
        (it, float(values[key]))
        for it, values in sorted(by_iteration.items())
        if key in values and not math.isnan(float(values[key]))
    ]


def metric_keys(by_iteration: Dict[int, Dict[str, float]]) -> List[str]:
    """The evaluation keys plotted by default (``*/AP``, ``*/mIoU``, ``*/top1``), sorted."""
    keys = {k for values in by_iteration.values() for k in values}
    return sorted(k for k in keys if k.endswith(DEFAULT_METRIC_SUFFIXES))


def plot(
    by_iteration: Dict[int, Dict[str, float]],
    output: str,
    metrics: Optional[Sequence[str]] = None,
    all_losses: bool = False,
    title: Optional[str] = None,
) -> None:
    """Write the two-panel figure (losses | metrics) to ``output``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = {k for values in by_iteration.values() for k in values}
    losses = ["total_loss"] + (
        sorted(k for k in keys if k.startswith("loss")) if all_losses else []
    )
    metrics = list(metrics) if metrics else metric_keys(by_iteration)
    missing = [k for k in losses[:1] + metrics if k not in keys]
    if missing:
        raise ValueError(f"metrics.json has no {missing}; it has {sorted(keys)}")
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.4))
    for key in losses:
        its, values = zip(*series(by_iteration, key))
        ax_loss.plot(its, values, label=key, linewidth=1.5 if key == "total_loss" else 1.0)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    if all_losses:
        ax_loss.legend(fontsize=7)
    for key in metrics:
        points = series(by_iteration, key)
        if points:
            its, values = zip(*points)
            ax_metric.plot(its, values, marker="o", label=key)
    ax_metric.set_xlabel("iteration")
    ax_metric.set_ylabel("validation")
    ax_metric.set_ylim(0, 100)
    ax_metric.set_xlim(ax_loss.get_xlim())
    ax_metric.grid(alpha=0.3)
    ax_metric.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("metrics_json", help="a run's metrics.json")
    parser.add_argument("--output", required=True, help="image file to write (.png, .svg, ...)")
    parser.add_argument("--metrics", nargs="+", help="evaluation keys, e.g. segm/AP bbox/AP")
    parser.add_argument("--all-losses", action="store_true", help="also plot every loss_* key")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    plot(read_metrics(args.metrics_json), args.output, args.metrics, args.all_losses, args.title)


if __name__ == "__main__":
    main()
