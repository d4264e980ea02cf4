"""torch.compile (Inductor, CPU) of RedNet models equals eager; a bf16 CPU autocast detector step.

* The RedNet-26 classifier and the Faster R-CNN RedNet-26 FPN backbone of
  configs/Shapes/faster_rcnn_rednet26_fpn.yaml, compiled with Inductor (one fresh cache directory
  for this module, so the compile is real; the two models share their stage kernels): forward
  outputs within rtol 1e-4 / atol 1e-5 of eager, every parameter gradient within 1e-4 of its
  largest entry (fp32; a bias gradient sums thousands of terms, so a fixed atol would test the
  summation order). Inputs are small (64x64) to keep the compile and the run cheap; the
  involution op is one opaque custom-op node in the graph.
* One training step of the Shapes Faster R-CNN under ``torch.autocast("cpu", torch.bfloat16)``:
  every loss finite and within 5% (relative) of the fp32 step with the same seed (bf16 keeps 8
  mantissa bits; the ROI losses also see slightly different proposals), gradients finite.
"""

from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone, build_model
from detectron2.utils.events import EventStorage
from random_weights import randomize_norms

from d2_involution import add_involution_config
from d2_involution.classification import RedNetClassifier
from d2_involution.modeling import build_rednet

REPO = Path(__file__).resolve().parents[1]
FASTER_RCNN = REPO / "configs" / "Shapes" / "faster_rcnn_rednet26_fpn.yaml"


@pytest.fixture(scope="module")
def fresh_inductor_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        torch._dynamo.reset()
        yield
        torch._dynamo.reset()


def _shapes_cfg(*opts: str):
    cfg = add_involution_config(get_cfg())
    cfg.merge_from_file(str(FASTER_RCNN))
    cfg.merge_from_list(list(opts))
    return cfg


def _outputs_and_grads(model: torch.nn.Module, x: torch.Tensor):
    out = model(x)
    tensors = [out] if isinstance(out, torch.Tensor) else [out[k] for k in sorted(out)]
    loss = sum((t.float() * torch.linspace(-1, 1, t.numel()).view(t.shape)).sum() for t in tensors)
    loss.backward()
    module = getattr(model, "_orig_mod", model)  # a compiled module shares the eager parameters
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return [t.detach() for t in tensors], grads


def _compare_compiled(model: torch.nn.Module, x: torch.Tensor) -> None:
    eager_out, eager_grads = _outputs_and_grads(model, x)
    compiled = torch.compile(model, backend="inductor")
    out, grads = _outputs_and_grads(compiled, x)
    assert len(eager_grads) > 50 and grads.keys() == eager_grads.keys()
    errors = [float((a - b).abs().max()) for a, b in zip(out, eager_out)]
    errors += [float((g - eager_grads[n]).abs().max()) for n, g in grads.items()]
    print(f"compiled vs eager: max |difference| {max(errors):.3g} (outputs and gradients)")
    for a, b in zip(out, eager_out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for name, g in grads.items():
        scale = float(eager_grads[name].abs().max())
        torch.testing.assert_close(g, eager_grads[name], rtol=0, atol=1e-4 * scale + 1e-7, msg=name)


def test_compiled_classifier_matches_eager(fresh_inductor_cache):
    torch.manual_seed(0)
    model = randomize_norms(RedNetClassifier(build_rednet(26, stem_involution_kernel=3), 10))
    _compare_compiled(model.eval(), torch.randn(1, 3, 64, 64))


def test_compiled_faster_rcnn_backbone_matches_eager(fresh_inductor_cache):
    torch.manual_seed(0)
    backbone = randomize_norms(build_backbone(_shapes_cfg()))
    _compare_compiled(backbone.eval(), torch.randn(1, 3, 64, 64))


def _detector_losses(model, batch, autocast: bool):
    torch.manual_seed(0)
    with EventStorage(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses = model(batch)
    total = sum(losses.values())
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)
    return {k: float(v) for k, v in losses.items()}


def test_bf16_autocast_training_step_matches_fp32(shapes_train_dicts):
    from detectron2.data import DatasetMapper

    cfg = _shapes_cfg("MODEL.REDNET.NORM", "BN", "INPUT.MIN_SIZE_TRAIN", "(64,)")
    cfg.INPUT.MAX_SIZE_TRAIN = 64
    torch.manual_seed(0)
    model = build_model(cfg).train()
    mapper = DatasetMapper(cfg, is_train=False)
    batch = []
    for d in shapes_train_dicts[:2]:
        item = mapper(dict(d))
        item["instances"] = _instances(d, item)
        batch.append(item)
    fp32 = _detector_losses(model, batch, autocast=False)
    bf16 = _detector_losses(model, batch, autocast=True)
    assert fp32.keys() == bf16.keys() and len(fp32) == 4
    for name, value in fp32.items():
        print(f"{name}: fp32 {value:.5f}, bf16 autocast {bf16[name]:.5f}")
        assert abs(bf16[name] - value) <= 0.05 * abs(value), (name, bf16[name], value)


def _instances(dataset_dict, item):
    """Ground truth at the mapped image's size (the test mapper drops annotations)."""
    from detectron2.data import detection_utils as utils
    from detectron2.data import transforms as T

    h, w = item["image"].shape[1:]
    scale = T.ScaleTransform(dataset_dict["height"], dataset_dict["width"], h, w)
    boxes_only = [
        {k: v for k, v in a.items() if k != "segmentation"} for a in dataset_dict["annotations"]
    ]
    annos = [
        utils.transform_instance_annotations(a, T.TransformList([scale]), (h, w))
        for a in boxes_only
    ]
    return utils.annotations_to_instances(annos, (h, w))
