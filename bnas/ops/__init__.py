"""Op families. Importing this package registers them; ``primitives/*.yaml`` names presets.

One module per family group: ``conv_unit`` (the configurable binary conv), ``blocks``
(ResNet, Bi-Real and VGG blocks), ``nin``, ``basic`` (skip, zero, pools), ``downsample``,
``linear``, ``separable`` (DARTS's separable, dilated and factorized convs, real and
binary), ``stem_head`` (real first and last layers) and ``conv_pool`` (LeNet-5's unit).
Every binary op binarizes through ``bnas.binarize.BinaryConv2d`` / ``BinaryLinear``.
"""

from . import basic, blocks, cell_inputs, conv_pool, conv_unit, downsample, linear, nin, separable, stem_head  # noqa: F401
