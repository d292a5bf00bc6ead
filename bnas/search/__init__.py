"""Architecture search: search-space YAML -> Optuna study -> genotype files."""

from .runner import SearchConfig, run_search_study
from .space import SearchSpace, load_space, sample_genotype
from .storage import SearchError
from .supernet import Supernet, SupernetError, extract, path_angle, recalibrate_bn, score, train_supernet_epoch
from .supernet_run import initial_of, initial_supernet, load_supernet, train_supernet

__all__ = [
    "SearchConfig",
    "SearchError",
    "SearchSpace",
    "Supernet",
    "SupernetError",
    "extract",
    "initial_of",
    "initial_supernet",
    "load_space",
    "load_supernet",
    "path_angle",
    "recalibrate_bn",
    "run_search_study",
    "sample_genotype",
    "score",
    "train_supernet",
    "train_supernet_epoch",
]
