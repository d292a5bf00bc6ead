"""Checkpoints: atomic writes, ``weights_only`` loads, RNG states, and the checks that decide
whether a checkpoint can resume a run."""

from __future__ import annotations

import os
import pickle
import random
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from ..atomic import atomic_path
from .recipe import Recipe, TrainingError, recipe_changes

__all__ = [
    "CHECKPOINT_FORMAT",
    "RESUME_ADVICE",
    "STATE_KEYS",
    "check_resumable",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "state_mismatch",
    "write_reason",
]

CHECKPOINT_FORMAT = 1
# Entries every trainer checkpoint has (``Trainer.state``); a file without them cannot resume.
STATE_KEYS = ("model", "optimizer", "epoch", "history", "best_val_acc", "best_epoch", "patience", "best_state", "rng")
RESUME_ADVICE = "delete it (or choose another --out) and run without --resume to start again"


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, as tensors and plain types (``weights_only`` loads)."""
    # The legacy form is always this tuple (numpy's stubs also allow the dict form).
    _kind, keys, pos, has_gauss, gauss = cast(
        "tuple[str, np.ndarray, int, int, float]", np.random.get_state(legacy=True)
    )
    version, py_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNG states ``rng_state`` took (CUDA's only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> None:
    """Write ``payload`` via a temp file + rename: a crash or a full disk never leaves half a
    checkpoint, and the previous one stays intact (a failure is a ``WriteError``)."""
    with atomic_path(path, "checkpoint") as tmp:
        torch.save(dict(payload), tmp)


def load_checkpoint(path: str | os.PathLike[str], advice: str = "delete it or pass another file") -> dict[str, Any]:
    """A checkpoint written by ``save_checkpoint`` (or any ``weights_only``-safe file).

    Every way the file can be bad (missing, empty, truncated, foreign bytes, pickled code,
    not a mapping) is one ``TrainingError`` naming the file and ending with ``advice``. Torch's
    own text is never repeated: for a file with pickled objects it suggests
    ``weights_only=False``, which would run whatever code a hostile file holds.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"no checkpoint at {path}")
    try:
        with path.open("rb") as f:
            head = f.read(4)
        size = path.stat().st_size
    except OSError as exc:
        raise TrainingError(f"cannot read {path}: {exc.strerror or type(exc).__name__}; {advice}") from None
    if size == 0:
        raise TrainingError(f"{path} is empty (0 bytes): its write was cut short; {advice}")
    try:
        # weights_only: tensors and plain values only, never code from the file. Torch's
        # warnings about a foreign file's pickle protocol would only precede our error.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the file is readable, so any failure is its content's
        is_zip, is_pickle = head == b"PK\x03\x04", head[:1] == b"\x80"  # torch.save's formats, new and legacy
        if isinstance(exc, pickle.UnpicklingError) and (is_zip or is_pickle):
            what = "not a bnas checkpoint: it holds Python objects other than tensors and plain values, which bnas never loads"
        elif is_zip:
            what = "truncated or damaged (an incomplete PyTorch file)"
        else:
            what = "not a PyTorch checkpoint (foreign or random bytes)"
        raise TrainingError(f"{path} ({size} bytes) is {what}; {advice}") from None
    if not isinstance(state, dict):
        raise TrainingError(f"{path} holds a {type(state).__name__}, not a bnas checkpoint (a mapping); {advice}")
    return state


def state_mismatch(model: nn.Module, saved: Any) -> str | None:
    """The first difference between ``model``'s tensors and the checkpoint's ``saved`` ones."""
    if not isinstance(saved, Mapping):
        return f"its 'model' entry is a {type(saved).__name__}, not a state_dict"
    mine = model.state_dict()
    for key, tensor in mine.items():
        if key not in saved:
            return f"this network's tensor {key} {list(tensor.shape)} is missing from the checkpoint"
        other = saved[key]
        if not isinstance(other, Tensor):
            return f"its {key} is a {type(other).__name__}, not a tensor"
        if other.shape != tensor.shape:
            return (
                f"tensor {key} has shape {list(other.shape)} in the checkpoint but {list(tensor.shape)} in this network"
            )
    extra = [key for key in saved if key not in mine]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        return f"the checkpoint has tensor {extra[0]}{more}, which this network does not"
    return None


def write_reason(exc: BaseException) -> str:
    """Why a write failed, in words (torch's stream errors say "unexpected pos 704 vs 598")."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return "the file could not be written in full; the disk may be full"


def check_resumable(state: Any, where: str, advice: str, *, model: nn.Module, dataset: str, recipe: Recipe) -> None:
    """Refuse a checkpoint that cannot continue this run: not a trainer state, another
    dataset, a recipe changed beyond ``RESUMABLE_CHANGES``, or tensors of another network."""
    if not isinstance(state, Mapping):
        raise TrainingError(f"{where} holds a {type(state).__name__}, not a bnas training checkpoint; {advice}")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise TrainingError(
            f"{where} is not a bnas training checkpoint (no {', '.join(missing)} entries; "
            f"a bare model.pt or another program's file?); {advice}"
        )
    if state.get("dataset", dataset) != dataset:
        raise TrainingError(
            f"{where} was trained on {state['dataset']!r}, not {dataset!r}; pass --dataset {state['dataset']}"
        )
    changed = recipe_changes(state.get("recipe"), recipe)
    if changed:
        saved, mine = state["recipe"], recipe.to_dict()
        details = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {mine.get(k)!r} now" for k in changed)
        raise TrainingError(
            f"{where}: the recipe differs from the one the run started with ({details}); "
            "only epochs and patience may change when resuming"
        )
    mismatch = state_mismatch(model, state["model"])
    if mismatch is not None:
        raise TrainingError(
            f"{where} does not fit this network: {mismatch}; it was trained from another genotype "
            "or width: resume with that genotype, or choose another --out"
        )
