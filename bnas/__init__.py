"""bnas: neural architecture search over binary neural networks.

The data flows one way: genotype YAML -> ``Genotype`` -> networkx cell DAGs -> ``nn.Module``
-> trainer -> metrics and reports.
"""

from . import catalog as _catalog  # noqa: F401  (registers the op families and the shipped catalog)
from ._version import __version__
from .binarize import BinarizeConfig, BinaryConv2d, BinaryLinear
from .builder import build
from .errors import BnasError, GenotypeError
from .export import load_packed, pack_model
from .genotype import Genotype, load_genotype
from .importers import import_darts
from .metrics import summarize
from .registry import get_primitive, list_primitives, load_catalog, register_primitive

__all__ = [
    "BinarizeConfig",
    "BinaryConv2d",
    "BinaryLinear",
    "BnasError",
    "Genotype",
    "GenotypeError",
    "build",
    "get_primitive",
    "import_darts",
    "list_primitives",
    "load_catalog",
    "load_genotype",
    "load_packed",
    "pack_model",
    "register_primitive",
    "summarize",
    "__version__",
]
