"""Architecture search: search-space YAML -> Optuna study -> genotype files."""

from .runner import SearchConfig, run_search_study
from .space import SearchSpace, load_space, sample_genotype
from .storage import SearchError

__all__ = ["SearchConfig", "SearchError", "SearchSpace", "load_space", "run_search_study", "sample_genotype"]
