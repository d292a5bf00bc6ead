"""Architecture search: search-space YAML -> Optuna study -> genotype files."""
from .runner import SearchConfig, run_search_study
from .space import SearchSpace, load_space, sample_genotype

__all__ = ["SearchConfig", "SearchSpace", "load_space", "run_search_study", "sample_genotype"]
