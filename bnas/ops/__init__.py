"""Op families. Importing this package registers them; ``primitives/*.yaml`` names presets."""
from . import basic, binary  # noqa: F401
