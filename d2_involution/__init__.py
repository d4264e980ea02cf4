"""d2_involution: involution (Li et al., CVPR'21) and RedNet, native to Detectron2.

Importing the package makes the installed detectron2 usable (see :mod:`d2_involution.compat`) and
registers every component with Detectron2's registries: built-in datasets, backbones and heads.

The op and the layers need only PyTorch (and CuPy for CUDA tensors): ``from d2_involution.ops
import involution`` and ``from d2_involution.layers import Involution`` work where detectron2,
fvcore, OpenCV and pycocotools are not installed. Without detectron2, importing the package does
nothing else; its Detectron2 parts (``add_involution_config``, ``modeling``, ``data``, ...) then
raise an ImportError naming what is missing.
"""

__version__ = "0.1.0"

try:
    import detectron2  # noqa: F401
except ModuleNotFoundError as e:
    if e.name != "detectron2":
        raise
    _MISSING_DETECTRON2 = e
    __all__ = []
else:
    _MISSING_DETECTRON2 = None
    from . import compat  # noqa: F401  (first: fixes the detectron2 v0.6 fallback before any use)
    from . import classification, data, modeling  # noqa: F401  (registrations)
    from .config import add_involution_config

    __all__ = ["add_involution_config"]


def __getattr__(name: str):
    if name == "add_involution_config" and _MISSING_DETECTRON2 is not None:
        raise ImportError(
            f"d2_involution.{name} needs detectron2, which is not installed "
            f"({_MISSING_DETECTRON2}); only d2_involution.ops and d2_involution.layers work "
            "without it"
        ) from _MISSING_DETECTRON2
    raise AttributeError(f"module 'd2_involution' has no attribute {name!r}")
