"""The shared binarization core (moved into a package; split by job in the next commits)."""

from __future__ import annotations

from .quantizers import *  # noqa: F403
from .quantizers import FULL_PRECISION, BinaryLayer, __all__  # noqa: F401
