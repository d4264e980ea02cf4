"""d2_involution: involution (Li et al., CVPR'21) and RedNet, native to Detectron2.

Importing the package makes the installed detectron2 usable (see :mod:`d2_involution.compat`) and
registers every component with Detectron2's registries: built-in datasets, backbones and heads.
"""

from . import compat  # noqa: F401  (first: fixes the detectron2 v0.6 fallback before any use)
from . import data, modeling  # noqa: F401  (registrations)
from .config import add_involution_config

__all__ = ["add_involution_config"]
__version__ = "0.1.0"
