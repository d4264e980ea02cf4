#!/usr/bin/env python
"""Model speed and memory: RedNet-50 vs ResNet-50, side by side in one run.

For every model x AMP mode x memory layout it measures, on the same fixed synthetic inputs:

- training throughput: images/s over ``--iters`` timed steps (forward + backward + SGD step)
  after ``--warmup`` untimed ones, and the training peak memory;
- inference latency at batch 1 (median of ``--iters`` timed forwards, in ms);
- inference throughput at ``--batch`` (``--det-batch`` for detectors) and its peak memory.

Models: ``rednet50_cls`` (``RedNetClassifier(50)``) and ``resnet50_cls`` (torchvision
``resnet50(weights=None)``) at ``--image-size`` (224); Faster R-CNN and RetinaNet with a RedNet-50
FPN (conv and involution neck, configs/COCO-Detection/*rednet50*.yaml) and Detectron2's
R-50-FPN (its default config + the Base-RCNN-FPN / Base-RetinaNet keys, set in code) at
``--det-size`` (800x1333), random initialisation, a few boxes per image.

Peak memory on CUDA is ``torch.cuda.max_memory_allocated`` (weights, gradients, optimizer state and
activations; reset per phase), in MiB as mmdet logs it. On CPU it is the growth of the peak
resident set during the phase (Linux ``/proc/self/clear_refs`` + ``VmHWM``; allocator caching makes
it a rough lower bound), or "n/a" where that is unavailable.

Examples::

    python tools/benchmark.py --device cuda --amp none,bf16 --channels-last --batch 64 \\
        --output docs/benchmark_models_h100
    python tools/benchmark.py --device cpu --models rednet50_cls,resnet50_cls --batch 2 \\
        --iters 2 --warmup 1 --image-size 64
"""

import d2_involution  # isort: skip  # noqa: F401  (first: detectron2 compat + registrations)
import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn
from torch.nn import functional as F

from d2_involution import add_involution_config
from d2_involution.classification import RedNetClassifier
from d2_involution.modeling import build_rednet
from d2_involution.ops import cpu_kernel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AMP_DTYPES: Dict[str, Optional[torch.dtype]] = {
    "none": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
NUM_CLASSES_CLS = 1000
NUM_BOXES = 4

# name -> (kind, "rednet50"/"resnet50" for the classifiers or a config file for the detectors)
MODELS: Dict[str, Tuple[str, object]] = {
    "rednet50_cls": ("cls", "rednet50"),
    "resnet50_cls": ("cls", "resnet50"),
    "faster_rcnn_rednet50_fpn": ("det", "configs/COCO-Detection/faster_rcnn_rednet50_fpn_1x.yaml"),
    "faster_rcnn_rednet50_involution_fpn": (
        "det",
        "configs/COCO-Detection/faster_rcnn_rednet50_involution_fpn_1x.yaml",
    ),
    "faster_rcnn_R50_fpn": ("det", "configs/Detectron2-Baselines/faster_rcnn_R_50_FPN_1x.yaml"),
    "retinanet_rednet50_fpn": ("det", "configs/COCO-Detection/retinanet_rednet50_fpn_1x.yaml"),
    "retinanet_rednet50_involution_fpn": (
        "det",
        "configs/COCO-Detection/retinanet_rednet50_involution_fpn_1x.yaml",
    ),
    "retinanet_R50_fpn": ("det", "configs/Detectron2-Baselines/retinanet_R_50_FPN_1x.yaml"),
}

COLUMNS = [
    ("model", "model"),
    ("params_m", "params (M)"),
    ("amp", "AMP"),
    ("layout", "layout"),
    ("batch", "batch"),
    ("input", "input"),
    ("train_ips", "train img/s"),
    ("train_peak_mib", "train peak MiB"),
    ("infer_b1_ms", "infer b1 median ms"),
    ("infer_ips", "infer img/s"),
    ("infer_peak_mib", "infer peak MiB"),
    ("note", "note"),
]


@dataclass
class Result:
    """One row of the table: one model in one AMP mode and memory layout."""

    model: str
    amp: str
    layout: str
    batch: int
    input: str
    params_m: Optional[float] = None
    train_ips: Optional[float] = None
    train_peak_mib: Optional[float] = None
    infer_b1_ms: Optional[float] = None
    infer_ips: Optional[float] = None
    infer_peak_mib: Optional[float] = None
    note: str = ""


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of one phase: CUDA ``max_memory_allocated`` or CPU peak-RSS growth (MiB)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._start_rss_kib: Optional[int] = None

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self._start_rss_kib = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self._start_rss_kib = self._status_kib("VmRSS")
        except (OSError, StopIteration, ValueError):
            self._start_rss_kib = None

    def peak_mib(self) -> Optional[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._start_rss_kib is None:
            return None
        try:
            return max(0, self._status_kib("VmHWM") - self._start_rss_kib) / 1024
        except (OSError, StopIteration, ValueError):
            return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------------


def detection_cfg(name: str, device: torch.device) -> CfgNode:
    """The config of detector ``name`` with random initialisation on ``device``."""
    cfg = add_involution_config(get_cfg())
    cfg.merge_from_file(os.path.join(REPO_ROOT, MODELS[name][1]))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = str(device)
    cfg.freeze()
    return cfg


def build(name: str, device: torch.device) -> nn.Module:
    """Model ``name`` (a key of ``MODELS``) with random initialisation, on ``device``."""
    if name not in MODELS:
        raise ValueError(f"build: name must be one of {sorted(MODELS)}, got {name!r}")
    kind, source = MODELS[name]
    if kind == "det":
        return build_model(detection_cfg(name, device)).to(device)
    if source == "rednet50":
        model = RedNetClassifier(build_rednet(50, stem_involution_kernel=3), NUM_CLASSES_CLS)
    else:
        import torchvision

        model = torchvision.models.resnet50(weights=None, num_classes=NUM_CLASSES_CLS)
    return model.to(device)


def classification_inputs(
    batch: int, size: int, device: torch.device, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fixed normalised images (batch, 3, size, size) and labels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    labels = torch.randint(0, NUM_CLASSES_CLS, (batch,), generator=g)
    return images.to(device), labels.to(device)


def detection_inputs(
    batch: int, height: int, width: int, device: torch.device, seed: int = 0
) -> List[Dict[str, object]]:
    """Fixed Detectron2 batched inputs: 0-255 images (3, H, W) with ``NUM_BOXES`` boxes each."""
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(batch):
        image = torch.randint(0, 256, (3, height, width), generator=g).float()
        xy = torch.rand(NUM_BOXES, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
        wh = (0.1 + 0.2 * torch.rand(NUM_BOXES, 2, generator=g)) * torch.tensor([width, height])
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        instances.gt_classes = torch.randint(0, 80, (NUM_BOXES,), generator=g)
        inputs.append({"image": image.to(device), "instances": instances.to(device)})
    return inputs


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> List[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def measure(
    name: str,
    device: torch.device,
    amp: str,
    channels_last: bool,
    batch: int,
    size: Tuple[int, int],
    warmup: int,
    iters: int,
) -> Result:
    """Training throughput/peak memory and inference latency/throughput of one configuration."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"measure: amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    if batch < 1 or warmup < 0 or iters < 1:
        raise ValueError(
            f"measure: need batch >= 1, warmup >= 0, iters >= 1, got {batch}, {warmup}, {iters}"
        )
    kind = MODELS[name][0] if name in MODELS else None
    result = Result(
        model=name,
        amp=amp,
        layout="channels_last" if channels_last else "contiguous",
        batch=batch,
        input=f"{size[0]}x{size[1]}",
    )
    dtype = AMP_DTYPES[amp]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build(name, device).to(memory_format=memory_format)
    result.params_m = sum(p.numel() for p in model.parameters()) / 1e6
    peak = PeakMemory(device)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    if kind == "cls":
        images, labels = classification_inputs(batch, size[0], device)
        images = images.contiguous(memory_format=memory_format)
        single = images[:1].contiguous(memory_format=memory_format)

        def loss_fn() -> torch.Tensor:
            return F.cross_entropy(model(images), labels)

        def infer(x: torch.Tensor) -> Callable[[], None]:
            return lambda: model(x)

        batch_input, single_input = images, single
    else:
        inputs = detection_inputs(batch, size[0], size[1], device)

        def loss_fn() -> torch.Tensor:
            return sum(model(inputs).values())

        def infer(x: List[Dict[str, object]]) -> Callable[[], None]:
            return lambda: model(x)

        batch_input = [{"image": d["image"]} for d in inputs]
        single_input = batch_input[:1]

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    model.train()
    peak.reset()
    with EventStorage(0):  # detectron2's losses log to the current event storage
        times = _timed(train_step, device, warmup, iters)
    result.train_ips = batch * iters / sum(times)
    result.train_peak_mib = peak.peak_mib()
    optimizer.state.clear()  # momentum buffers: not part of the inference peak
    model.zero_grad(set_to_none=True)
    _free(device)

    model.eval()
    with torch.inference_mode(), autocast():
        times = _timed(infer(single_input), device, warmup, iters)
        result.infer_b1_ms = 1000 * statistics.median(times)
        peak.reset()
        times = _timed(infer(batch_input), device, warmup, iters)
        result.infer_ips = batch * iters / sum(times)
        result.infer_peak_mib = peak.peak_mib()
    return result


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(
    models: Sequence[str],
    device: torch.device,
    amps: Sequence[str],
    layouts: Sequence[bool],
    batch: int,
    det_batch: int,
    image_size: int,
    det_size: Tuple[int, int],
    warmup: int,
    iters: int,
    on_result: Optional[Callable[[Result], None]] = None,
    rounds: int = 1,
) -> List[Result]:
    """All configurations, one model at a time; with ``rounds`` > 1 all of them ``rounds`` times in
    turn, and each row is the median over the rounds (see :func:`combine_rounds`), so that a change
    of load on a shared machine hits every configuration alike. ``on_result`` gets every single
    measurement.

    A configuration that fails (out of memory, a kernel that does not compile) becomes a row with
    the error in ``note`` (traceback on stderr), so that one GPU run always yields a full table.
    """
    if rounds < 1:
        raise ValueError(f"run: rounds must be >= 1, got {rounds}")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"run: models must be among {sorted(MODELS)}, got unknown {unknown}")
    bad_amp = [a for a in amps if a not in AMP_DTYPES]
    if bad_amp:
        raise ValueError(f"run: amp modes must be among {sorted(AMP_DTYPES)}, got {bad_amp}")
    results = []
    for _ in range(rounds):
        results += _run_round(
            models,
            device,
            amps,
            layouts,
            batch,
            det_batch,
            image_size,
            det_size,
            warmup,
            iters,
            on_result,
        )
    return combine_rounds(results)


def _run_round(
    models, device, amps, layouts, batch, det_batch, image_size, det_size, warmup, iters, on_result
) -> List[Result]:
    results = []
    for name in models:
        is_cls = MODELS[name][0] == "cls"
        size = (image_size, image_size) if is_cls else det_size
        model_batch = batch if is_cls else det_batch
        for amp in amps:
            for channels_last in layouts:
                try:
                    result = measure(
                        name, device, amp, channels_last, model_batch, size, warmup, iters
                    )
                except Exception as e:  # OOM, a kernel that fails to compile: record it, keep going
                    traceback.print_exc()
                    result = Result(
                        model=name,
                        amp=amp,
                        layout="channels_last" if channels_last else "contiguous",
                        batch=model_batch,
                        input=f"{size[0]}x{size[1]}",
                        note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}",
                    )
                _free(device)
                results.append(result)
                if on_result is not None:
                    on_result(result)
    return results


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def combine_rounds(results: Sequence[Result]) -> List[Result]:
    """One row per configuration (first-seen order): the median of its throughputs and latency,
    the largest of its peaks, and the notes of its rounds; ``note`` says how many rounds."""
    groups: Dict[Tuple[str, str, str], List[Result]] = {}
    for r in results:
        groups.setdefault((r.model, r.amp, r.layout), []).append(r)
    combined = []
    for rows in groups.values():
        if len(rows) == 1:
            combined.append(rows[0])
            continue
        out = Result(**{**asdict(rows[0]), "note": ""})
        for key in ("train_ips", "infer_b1_ms", "infer_ips"):
            values = [getattr(r, key) for r in rows if getattr(r, key) is not None]
            setattr(out, key, statistics.median(values) if values else None)
        for key in ("train_peak_mib", "infer_peak_mib"):
            values = [getattr(r, key) for r in rows if getattr(r, key) is not None]
            setattr(out, key, max(values) if values else None)
        notes = sorted({r.note for r in rows if r.note})
        out.note = "; ".join([f"median of {len(rows)} rounds", *notes])
        combined.append(out)
    return combined


def environment(device: torch.device, argv: Sequence[str]) -> Dict[str, str]:
    """Device name, software versions and the command line, for the report header."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        name += f"{torch.get_num_threads()} torch threads)"
    import torchvision

    env = {
        "device": name,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda) if device.type == "cuda" else "n/a (cpu run)",
        "cudnn": str(torch.backends.cudnn.version()) if device.type == "cuda" else "n/a",
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "command": "python tools/benchmark.py " + " ".join(argv),
    }
    if device.type == "cpu":
        env["involution kernel threads"] = cpu_kernel.thread_runtime() or "none (pure PyTorch)"
    return env


def _fmt(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(results: Sequence[Result], env: Dict[str, str]) -> str:
    """The environment as a bullet list and the results as one markdown table."""
    lines = [f"- {key}: `{value}`" for key, value in env.items()]
    lines += ["", "| " + " | ".join(title for _, title in COLUMNS) + " |"]
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for r in results:
        row = asdict(r)
        lines.append("| " + " | ".join(_fmt(row[key]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _csv(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}"
    )
    parser.add_argument("--amp", default="none,bf16", help="comma-separated: none, fp16, bf16")
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="also run every model in channels_last (side by side with contiguous)",
    )
    parser.add_argument("--batch", type=int, default=64, help="classifier batch")
    parser.add_argument("--det-batch", type=int, default=2, help="detector batch (mmdet: 2/GPU)")
    parser.add_argument("--image-size", type=int, default=224, help="classifier input size")
    parser.add_argument(
        "--det-size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"), help="detector"
    )
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure all configurations this many times in turn"
    )
    parser.add_argument("--output", default="", help="write OUTPUT.md and OUTPUT.json")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        torch.backends.cudnn.benchmark = True
    env = environment(device, argv)
    output = args.output[:-3] if args.output.endswith(".md") else args.output
    layouts = [False, True] if args.channels_last else [False]

    def on_result(result: Result) -> None:
        print(
            f"[benchmark] {result.model} amp={result.amp} {result.layout}: "
            f"train {_fmt(result.train_ips)} img/s, peak {_fmt(result.train_peak_mib)} MiB; "
            f"infer b1 {_fmt(result.infer_b1_ms)} ms, {_fmt(result.infer_ips)} img/s "
            f"{result.note}",
            flush=True,
        )
        done.append(result)
        if output:
            _write(output, env, combine_rounds(done))

    done: List[Result] = []
    results = run(
        _csv(args.models),
        device,
        _csv(args.amp),
        layouts,
        args.batch,
        args.det_batch,
        args.image_size,
        tuple(args.det_size),
        args.warmup,
        args.iters,
        on_result=on_result,
        rounds=args.rounds,
    )
    if output:
        _write(output, env, results)
    table = markdown_table(results, env)
    print(table)
    return table


def _write(output: str, env: Dict[str, str], results: Sequence[Result]) -> None:
    """Write ``output``.md and ``output``.json (rewritten after every row: partial runs survive)."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output + ".md", "w") as f:
        f.write(markdown_table(results, env))
    with open(output + ".json", "w") as f:
        json.dump({"environment": env, "results": [asdict(r) for r in results]}, f, indent=1)


if __name__ == "__main__":
    main()
