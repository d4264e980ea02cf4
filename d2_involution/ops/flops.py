"""fvcore / Detectron2 FLOP counting for the involution op.

``torch.jit.trace`` records ``involution`` as one ``d2_involution::involution`` node (see
``d2_involution.ops.involution``); fvcore skips nodes it has no handle for. Register ours with::

    from detectron2.utils.analysis import FlopCountAnalysis  # or fvcore.nn.FlopCountAnalysis
    from d2_involution.ops.flops import add_involution_flop_handles

    flops = add_involution_flop_handles(FlopCountAnalysis(model, inputs)).total()

It counts K*K*C*Ho*Wo multiply-adds per image (fvcore's convention: one multiply-add is one flop,
as for convolutions). The backward ops are counted the same way if a trace ever contains them.
The fused op (``involution_fused``) also counts its kernel generation, K*K*G*R*Ho*Wo, so that a
model has the same total fused or not (fvcore counts that 1x1 convolution when it is unfused).
"""

from typing import Any, Callable, Dict, List

__all__ = [
    "involution_flop_jit",
    "involution_fused_flop_jit",
    "involution_flop_handles",
    "add_involution_flop_handles",
]

OP_NAME = "d2_involution::involution"
FUSED_OP_NAME = "d2_involution::involution_fused"


def _shape(value: Any) -> List[int]:
    return list(value.type().sizes())


def involution_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle: N * C * Ho * Wo * K * K multiply-adds for one involution node."""
    weight_shape = _shape(inputs[1])
    out_shape = _shape(outputs[0])
    K = weight_shape[2]
    N, C, Ho, Wo = out_shape
    return N * C * Ho * Wo * K * K


def involution_fused_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle of the fused op: the aggregation plus the generating 1x1 convolution."""
    N, C, Ho, Wo = _shape(outputs[0])
    M, R = _shape(inputs[2])[:2]
    K = int(inputs[4].toIValue())
    return N * C * Ho * Wo * K * K + N * M * R * Ho * Wo


def involution_flop_handles() -> Dict[str, Callable]:
    """``{op name: handle}`` for ``FlopCountAnalysis.set_op_handle(**...)``-style registration."""
    return {OP_NAME: involution_flop_jit, FUSED_OP_NAME: involution_fused_flop_jit}


def add_involution_flop_handles(analysis: Any) -> Any:
    """Register the involution handle on an fvcore/Detectron2 ``FlopCountAnalysis``; returns it."""
    for name, handle in involution_flop_handles().items():
        analysis.set_op_handle(name, handle)
    return analysis
