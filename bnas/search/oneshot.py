"""One-shot search (``bnas search SPACE --supernet RUN/supernet.pt``): every trial is scored
with the weights it inherits from a trained supernet instead of being trained.

The trial itself (sampling, constraints checked first, duplicates reused) is ``Objective``'s,
unchanged; this module supplies what replaces training there: the supernet, loaded once per
process and checked against the space (``load_oneshot``), and a ``SupernetScorer`` that rates
a genotype with ``supernet.score`` on calibration batches drawn once per process with the
search's seed (so every trial, in every worker, is scored on the same batches), optionally
after fine-tuning a copy of the inherited weights for a few seeded steps (``--finetune-steps``),
and optionally by a linear probe refitted on the path's own features (``--probe-samples``).
With ``--supernet-score angle`` it rates a genotype by ABS's angle instead (``supernet.path_angle``,
against the untrained supernet rebuilt from the supernet's seed), which reads no data.

A one-shot study records its supernet (``SUPERNET_ATTR``: path, file hash, epochs trained,
score, calibration batches, fine-tuning steps, probe samples); ``check_supernet`` refuses to resume it without that
supernet or with another scoring, or a per-trial study with one: their scores would not compare.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ..data import DataSplits
from ..genotype import Genotype
from .config import SearchConfig
from .storage import SearchError
from .supernet import Supernet, SupernetError, calibration_batches, path_angle, score

__all__ = [
    "CALIBRATION_BATCH_SIZE",
    "SUPERNET_ATTR",
    "OneShot",
    "SupernetScorer",
    "check_supernet",
    "file_sha256",
    "load_oneshot",
]

SUPERNET_ATTR = "supernet"  # the study user attr of a one-shot study
CALIBRATION_BATCH_SIZE = 64


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class OneShot:
    """A loaded supernet and what a study scored with it records (``info``)."""

    supernet: Supernet
    info: dict[str, Any] = field(default_factory=dict)
    # With --supernet-score angle: the supernet as training started (the angle's reference).
    initial: Supernet | None = None


# One supernet per process: open_study and the objective both ask for it.
_loaded: dict[tuple[Any, ...], OneShot] = {}


def load_oneshot(cfg: SearchConfig) -> OneShot:
    """``cfg.supernet`` loaded on ``cfg.device`` (once per process) and checked against
    ``cfg.space``: a ``SupernetError`` naming the file when it is missing, not a supernet, or
    trained on another space."""
    if cfg.supernet is None:
        raise SupernetError("load_oneshot needs a search configured with --supernet")
    path = Path(cfg.supernet).resolve()
    if not path.is_file():
        raise SupernetError(
            f"--supernet {cfg.supernet}: no such file; train one with `bnas supernet SPACE.yaml --out RUN` "
            "and give RUN/supernet.pt"
        )
    stat = path.stat()
    key = (
        str(path),
        stat.st_size,
        stat.st_mtime_ns,
        cfg.device,
        cfg.space.fingerprint(),
        cfg.supernet_score,
        cfg.calibration_batches,
        cfg.finetune_steps,
        cfg.probe_samples,
    )
    if key not in _loaded:
        from .supernet_run import initial_of, load_supernet  # the training module, only for one-shot searches

        supernet = load_supernet(path, cfg.space, device=cfg.device)
        meta = getattr(supernet, "meta", {}) or {}
        if int(meta.get("seed", cfg.seed)) != cfg.seed:
            # The seed carves the validation split: another one would score trials on images
            # the supernet trained on.
            raise SupernetError(
                f"--supernet {cfg.supernet} was trained with --seed {meta['seed']}, which holds out the "
                f"validation images trials are scored on; search with --seed {meta['seed']}"
            )
        initial = None
        if cfg.supernet_score == "angle":
            initial = initial_of(supernet)
        info = {
            "path": str(path),
            "sha256": file_sha256(path),
            "epochs": int(meta.get("epochs", 0)),
            "score": cfg.supernet_score,
            "calibration_batches": cfg.calibration_batches,
            "finetune_steps": cfg.finetune_steps,
            "probe_samples": cfg.probe_samples,
        }
        _loaded.clear()
        _loaded[key] = OneShot(supernet, info, initial)
    return _loaded[key]


def check_supernet(stored: Mapping[str, Any] | None, given: Mapping[str, Any] | None, where: str) -> None:
    """Refuse to resume a study with another scoring than it was made with (nothing changed)."""
    other = "pick another --study name or --out folder (nothing was changed)"
    if stored is None and given is None:
        return
    if given is None:
        assert stored is not None
        raise SearchError(
            f"{where} is a one-shot study scored with the supernet {stored['path']}; resume it with "
            f"--supernet {stored['path']}, or {other}"
        )
    if stored is None:
        raise SearchError(
            f"{where} trains every trial (it was made without --supernet); resume it without --supernet, "
            f"or for a one-shot search {other}"
        )
    if stored.get("sha256") != given.get("sha256"):
        raise SearchError(
            f"{where} was scored with another supernet ({stored['path']}, {stored.get('epochs')} epochs, "
            f"sha256 {str(stored.get('sha256'))[:12]}), not {given['path']} ({given.get('epochs')} epochs, sha256 "
            f"{str(given.get('sha256'))[:12]}); its scores would not compare with new ones. Resume it with "
            f"--supernet {stored['path']}, or {other}"
        )
    # Studies from before --supernet-score were scored by accuracy.
    made_by, asked = stored.get("score", "accuracy"), given.get("score", "accuracy")
    if made_by != asked:
        raise SearchError(
            f"{where} scored each trial by its {made_by}, not by its {asked}; resume it with "
            f"--supernet-score {made_by}, or {other}"
        )
    if stored.get("calibration_batches") != given.get("calibration_batches"):
        raise SearchError(
            f"{where} recalibrated BatchNorm on {stored.get('calibration_batches')} batches per trial, not "
            f"{given.get('calibration_batches')}; resume it with --calibration-batches "
            f"{stored.get('calibration_batches')}, or {other}"
        )
    # Studies from before --finetune-steps scored the inherited weights as they were.
    if stored.get("finetune_steps", 0) != given.get("finetune_steps", 0):
        raise SearchError(
            f"{where} fine-tuned each trial's inherited weights for {stored.get('finetune_steps', 0)} steps before "
            f"scoring, not {given.get('finetune_steps', 0)}; resume it with --finetune-steps "
            f"{stored.get('finetune_steps', 0)}, or {other}"
        )
    # Studies from before --probe-samples scored with the shared classifier.
    if stored.get("probe_samples", 0) != given.get("probe_samples", 0):
        raise SearchError(
            f"{where} scored each trial with "
            + (
                f"a linear probe fitted on {stored['probe_samples']} training images"
                if stored.get("probe_samples")
                else "the supernet's own classifier"
            )
            + f", not as asked now; resume it with --probe-samples {stored.get('probe_samples', 0)}, or {other}"
        )


class SupernetScorer:
    """Scores a genotype with the supernet's inherited weights. By accuracy (the default),
    ``supernet.score`` on calibration batches drawn once, with the search's seed; with
    ``cfg.finetune_steps``, a copy of them first trains that many steps (the search's seed,
    the space's budget recipe); with ``cfg.probe_samples``, a linear probe on the path's
    features gives the accuracy. By angle, ``supernet.path_angle`` against the untrained
    supernet, with no data.

    A call returns the trial's score and the user attributes it records: by accuracy, the
    validation accuracy (the score) and mean cross-entropy (kept beside it: on
    ``fashion_mnist_cells`` it sometimes ranked architectures better,
    docs/oneshot-experiments.md); by angle, the angle in radians."""

    def __init__(self, oneshot: OneShot, data: DataSplits, cfg: SearchConfig):
        self.supernet = oneshot.supernet
        self.initial = oneshot.initial
        self.info = oneshot.info
        self.data = data
        self.seed = cfg.seed
        self.finetune_steps = cfg.finetune_steps
        self.probe_samples = cfg.probe_samples
        self.batches: list[Tensor] = []
        if self.initial is None:  # the angle reads no data
            self.batches = calibration_batches(
                data,
                num_batches=cfg.calibration_batches,
                batch_size=CALIBRATION_BATCH_SIZE,
                seed=cfg.seed,
                device=self.supernet.device,
            )

    def __call__(self, genotype: Genotype) -> tuple[float, dict[str, float]]:
        if self.initial is not None:
            angle = path_angle(self.supernet, self.initial, genotype)
            return angle, {"supernet_angle": angle}
        acc, loss = score(
            self.supernet,
            genotype,
            self.data,
            calibration=self.batches,
            seed=self.seed,
            with_loss=True,
            finetune_steps=self.finetune_steps,
            probe_samples=self.probe_samples,
        )
        return float(acc), {"supernet_acc": float(acc), "supernet_loss": float(loss), "val_acc": float(acc)}
