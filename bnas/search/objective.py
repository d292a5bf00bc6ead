"""One trial: sample a genotype, measure it, check the constraints, reuse a twin's result,
or train it and report every epoch to the pruner (or, in a one-shot search, score it with a
supernet's inherited weights: ``oneshot.py``).

A trial: sample a genotype (define-by-run), measure it and check the constraints *before*
training (an over-budget genotype, or one whose output cannot depend on its input
(``bnas.signal_flow``), costs no training: it is recorded as PRUNED at step 0, with the
reason in its ``constraint`` attribute), skip duplicates (same canonical
hash as an earlier trial: its result is reused, nothing is trained), then train for the
space's budget, reporting validation accuracy every epoch so the pruner can stop hopeless
trials early.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ..builder import build
from ..data import DataSplits, load_dataset
from ..errors import BnasError
from ..evaluate import evaluate
from ..genotype import Genotype
from ..metrics import summarize
from ..signal_flow import constant_output
from .config import SearchConfig
from .constraints import violations
from .space import SearchSpace, sample_genotype
from .stats import FINISHED
from .workers import reclaim_dead_trials

__all__ = ["Objective", "packed_latency_ms", "probe_genotype", "search_data"]


def search_data(space: SearchSpace, seed: int, data_root: str | None = None) -> DataSplits:
    """The splits every trial of a study trains and validates on (never the test set's labels).

    The validation split is carved from the training set with the study's seed, exactly as
    ``bnas eval`` carves it from the genotype's recipe, so a trial's genotype file retrained
    with ``bnas eval`` sees the same split. ``train_subset`` (a proxy task) keeps a seeded
    subset of the remaining training images.
    """
    data = load_dataset(
        space.dataset,
        data_root,
        val_fraction=float(space.budget.get("val_fraction", 0.1)),
        seed=seed,
        shape=space.input,
        num_classes=space.num_classes,
    )
    if space.train_subset is not None and space.train_subset < len(data.train_y):
        keep = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed + 1))[
            : space.train_subset
        ]
        data.train_x, data.train_y = data.train_x[keep], data.train_y[keep]
    return data


def probe_genotype(space: SearchSpace) -> Genotype:
    """The genotype that picks the first choice everywhere: a shape probe, built before any trial."""

    class _Recorder:
        number = 0

        def __init__(self) -> None:
            self.params: dict[str, Any] = {}

        def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
            self.params[name] = choices[0]
            return choices[0]

    rec = _Recorder()
    sample_genotype(rec, space)
    return sample_genotype(optuna.trial.FixedTrial(rec.params), space)


def cost_metrics(model: torch.nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
    """A network's counted costs under the names constraints and objectives use (``ops``,
    ``size``, ``params``, ``bops``, ``flops``): one batch-1 forward, no gradient."""
    with torch.no_grad():
        s = summarize(model, input_shape)
    return {
        "ops": float(s.ops),
        "size": float(s.size_bytes),
        "params": float(s.params_binary + s.params_real),
        "bops": float(s.bops),
        "flops": float(s.flops),
    }


def _trial_metrics(genotype: Genotype, with_latency: bool) -> dict[str, float]:
    model = build(genotype)
    metrics = cost_metrics(model, genotype.input)
    if with_latency:
        metrics["latency_ms"] = packed_latency_ms(model, genotype.input)
    return metrics


def packed_latency_ms(model: torch.nn.Module, shape: tuple[int, ...], repeats: int = 15) -> float:
    """Batch-1 CPU latency (ms) of the packed 1-bit inference network (``bnas export``'s
    model on the XNOR kernels): the median of repeats after warm-up. Weights do not change
    the time, so the untrained network is measured before any training."""
    from ..export import (
        pack_model,  # the export stack (kernels) only when latency is an objective
    )

    packed = pack_model(model)
    x = torch.randn(1, *shape)
    with torch.no_grad():
        for _ in range(3):
            packed(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            packed(x)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


class Objective:
    """The objective Optuna calls once per trial (see the module doc)."""

    def __init__(
        self,
        cfg: SearchConfig,
        data: DataSplits,
        study: optuna.Study,
        scorer: Callable[[Genotype], tuple[float, dict[str, float]]] | None = None,
    ):
        """``scorer`` (a one-shot search's ``oneshot.SupernetScorer``) rates a genotype
        instead of training it: its score, the trial's first objective value, and the user
        attributes to record (by accuracy: ``supernet_acc``, also the trial's val_acc, and
        ``supernet_loss``; by angle: ``supernet_angle``); no epoch is trained."""
        self.cfg, self.data, self.study, self.scorer = cfg, data, study, scorer
        self.space = cfg.space
        (cfg.out / "genotypes").mkdir(parents=True, exist_ok=True)

    def _earlier_twin(self, trial: optuna.Trial, digest: str) -> FrozenTrial | None:
        """An earlier finished trial with the same genotype. A twin still running in another
        worker is waited for (its worker is checked for death meanwhile), so no genotype is
        trained twice."""
        while True:
            twins = [
                t
                for t in self.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
                if t.user_attrs.get("genotype_hash") == digest
                and t.number < trial.number
                and "constraint" not in t.user_attrs
            ]
            done = [t for t in twins if t.state in FINISHED]
            if done:
                return done[0]
            if not twins:
                return None
            reclaim_dead_trials(self.study, heartbeat=bool(self.cfg.heartbeat))
            time.sleep(1.0)

    def _write_genotype(self, trial: optuna.Trial, genotype: Genotype, note: str) -> None:
        header = f"bnas search: study {self.cfg.name!r}, trial {trial.number} ({note})"
        path = self.cfg.out / "genotypes" / f"trial-{trial.number}.yaml"
        genotype.to_yaml(path, header=header)
        # Also into the study's artifact store, shared by all workers (a folder on a shared path).
        from optuna.artifacts import FileSystemArtifactStore, upload_artifact

        store_dir = self.cfg.artifacts or self.cfg.out / "artifacts"
        store_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            artifact = upload_artifact(
                artifact_store=FileSystemArtifactStore(str(store_dir)), file_path=str(path), study_or_trial=trial
            )
        trial.set_user_attr("genotype_artifact", artifact)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        space = self.space
        genotype = sample_genotype(trial, space, training={"seed": self.cfg.seed})
        digest = genotype.canonical_hash()
        trial.set_user_attr("genotype_hash", digest)
        trial.set_user_attr("epochs", 0)
        try:
            metrics = _trial_metrics(genotype, with_latency=space.needs_latency)
        except BnasError as exc:
            raise BnasError(f"the sampled genotype does not build: {exc}") from None
        for key, value in metrics.items():
            trial.set_user_attr(key, value)
        broken = violations(metrics, dict(space.constraints))
        constant = constant_output(genotype)
        if constant is not None:
            # Its network predicts one class for every image: training it teaches nothing.
            broken.append(f"constant output: {constant}")
        if broken:
            # Checked before any training: a rejected genotype costs nothing. PRUNED (not
            # FAIL) at step 0 with no value: samplers rank it below every trained trial and
            # learn to leave that region; the pruner's statistics are untouched.
            trial.set_user_attr("constraint", "; ".join(broken))
            self._write_genotype(trial, genotype, "rejected, not trained: " + "; ".join(broken))
            raise optuna.TrialPruned("rejected before training: " + "; ".join(broken))
        twin = self._earlier_twin(trial, digest)
        if twin is not None:
            return self._reuse(trial, genotype, twin)
        self._write_genotype(trial, genotype, "sampled")
        if self.scorer is not None:
            start = time.perf_counter()
            value, attrs = self.scorer(genotype)
            trial.set_user_attr("score_time_s", time.perf_counter() - start)
            for key, recorded in attrs.items():
                trial.set_user_attr(key, recorded)
            return self._values(value, metrics)

        def report(epoch: int, row: dict[str, float]) -> None:
            trial.set_user_attr("epochs", epoch)
            trial.set_user_attr("val_acc", max(row["val_acc"], trial.user_attrs.get("val_acc") or 0.0))
            if not space.multi_objective:
                trial.report(row["val_acc"], epoch)
                # After the last epoch there is nothing left to save: the trial completes.
                if epoch < space.epochs and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {epoch} (val acc {row['val_acc']:.4f})")

        if torch.device(self.cfg.device).type == "cpu":
            trial.set_user_attr("threads", torch.get_num_threads())  # `bnas eval --threads` repeats the training
        start = time.perf_counter()
        result = evaluate(
            genotype,
            space.dataset,
            device=self.cfg.device,
            data=self.data,
            progress=False,
            callbacks=[report],
            test=False,
            overrides={"seed": self.cfg.seed},
        )
        trial.set_user_attr("train_time_s", time.perf_counter() - start)
        val_acc = float(result["best_val_acc"])
        trial.set_user_attr("val_acc", val_acc)
        return self._values(val_acc, metrics)

    def _values(self, val_acc: float, metrics: dict[str, float]) -> float | tuple[float, ...]:
        values = [val_acc] + [metrics["latency_ms" if o == "latency" else o] for o in self.space.objectives[1:]]
        return tuple(values) if self.space.multi_objective else val_acc

    def _reuse(self, trial: optuna.Trial, genotype: Genotype, twin: FrozenTrial) -> float | tuple[float, ...]:
        """The same genotype as ``twin``: its result stands for this trial, nothing is trained."""
        trial.set_user_attr("duplicate_of", twin.number)
        trial.set_user_attr("val_acc", twin.user_attrs.get("val_acc"))
        for key in ("supernet_acc", "supernet_loss", "supernet_angle"):
            if key in twin.user_attrs:
                trial.set_user_attr(key, twin.user_attrs[key])
        if twin.state == TrialState.PRUNED:
            self._write_genotype(
                trial, genotype, f"same genotype as trial {twin.number}, which was pruned; not trained again"
            )
            # Its learning curve, so the sampler ranks this trial as it ranked the twin.
            for step, value in sorted(twin.intermediate_values.items()):
                trial.report(value, step)
            raise optuna.TrialPruned(f"same genotype as trial {twin.number}, which was pruned")
        self._write_genotype(trial, genotype, f"same genotype as trial {twin.number}; not trained again")
        return tuple(twin.values) if self.space.multi_objective else twin.values[0]
