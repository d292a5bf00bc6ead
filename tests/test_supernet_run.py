"""``bnas supernet`` (issue 14): a supernet training run, its supernet.pt (bit-identical
resume after an epoch or a Ctrl-C inside one, refusals), ``load_supernet`` and
``bnas eval --init-from``; on the tests' tiny digits space (input 1x8x8)."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_space, write_space

import bnas.search.supernet_run as run_module
from bnas.cli import main
from bnas.data import load_dataset
from bnas.evaluate import evaluate
from bnas.genotype import load_genotype
from bnas.search import SupernetError, extract
from bnas.search.space import load_space
from bnas.search.supernet import path_angle, score
from bnas.search.supernet_run import (
    SUPERNET_FILE,
    initial_of,
    initial_supernet,
    load_supernet,
    supernet_initialiser,
    train_supernet,
)

# History entries that measure the clock, not the training.
CLOCKS = {"epoch_time_s", "samples_per_s", "cpu_s"}


def space_file(folder: Path, **changes: object) -> Path:
    """The tests' tiny digits space (tests/data/tiny_space.yaml), with max pooling and two
    edges per node, so that zero-free paths differ in ops, inputs, widths and depths."""
    settings: dict[str, object] = {"ops": ["binary_conv_3x3", "skip_connect", "max_pool_3x3"], "edges_per_node": 2}
    return write_space(folder, tiny_space(**{**settings, **changes}))


def state(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def same_weights(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in ("epoch", "step_in_epoch"):
        assert a[key] == b[key]
    timeless = [{k: v for k, v in row.items() if k not in CLOCKS} for row in a["history"]]
    assert timeless == [{k: v for k, v in row.items() if k not in CLOCKS} for row in b["history"]]


def test_resume_after_an_epoch_is_bit_identical(tmp_path: Path) -> None:
    space = load_space(space_file(tmp_path))
    train_supernet(space, tmp_path / "straight", epochs=3)
    train_supernet(space, tmp_path / "split", epochs=1)
    assert state(tmp_path / "split" / SUPERNET_FILE)["epoch"] == 1
    train_supernet(space, tmp_path / "split", epochs=3, resume=True)  # --epochs may grow on resume
    same_weights(state(tmp_path / "straight" / SUPERNET_FILE), state(tmp_path / "split" / SUPERNET_FILE))
    history = json.loads((tmp_path / "split" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert {"val_acc_largest", "val_acc_sample1", "val_acc_sample2"} <= history[0].keys()
    assert (tmp_path / "split" / "curves.png").stat().st_size > 0


def test_ctrl_c_inside_an_epoch_saves_and_resumes_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    space = load_space(space_file(tmp_path))
    train_supernet(space, tmp_path / "straight", epochs=2)
    real_epoch = run_module.train_supernet_epoch

    def interrupted_epoch(*args: Any, on_step: Any, **kwargs: Any) -> Any:
        def step(done: int, totals: dict[str, float]) -> None:
            if args[5] == 1 and done == 7:  # epoch 2, after its 7th step: as a Ctrl-C would arrive
                os.kill(os.getpid(), signal.SIGINT)
            on_step(done, totals)

        return real_epoch(*args, on_step=step, **kwargs)

    monkeypatch.setattr(run_module, "train_supernet_epoch", interrupted_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_supernet(space, tmp_path / "split", epochs=2)
    saved = state(tmp_path / "split" / SUPERNET_FILE)
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 7)
    monkeypatch.setattr(run_module, "train_supernet_epoch", real_epoch)
    train_supernet(space, tmp_path / "split", epochs=2, resume=True)
    same_weights(state(tmp_path / "straight" / SUPERNET_FILE), state(tmp_path / "split" / SUPERNET_FILE))


def test_refusals_name_the_file_and_what_to_do(tmp_path: Path) -> None:
    space = load_space(space_file(tmp_path))
    out = tmp_path / "run"
    train_supernet(space, out, epochs=1)
    with pytest.raises(SupernetError, match="already holds a supernet .*--resume"):
        train_supernet(space, out, epochs=1)
    with pytest.raises(SupernetError, match="no supernet.pt in .*without --resume"):
        train_supernet(space, tmp_path / "empty", epochs=1, resume=True)
    with pytest.raises(SupernetError, match="seed 0, not 1"):
        train_supernet(space, out, epochs=2, resume=True, seed=1)
    with pytest.raises(SupernetError, match="distill False, not True"):
        train_supernet(space, out, epochs=2, resume=True, distill=True)
    with pytest.raises(SupernetError, match=r"recipe differs .*optimizer"):
        train_supernet(space, out, epochs=2, resume=True, overrides={"optimizer.lr": 0.5})
    (tmp_path / "other").mkdir()
    other = load_space(space_file(tmp_path / "other", ops=["binary_conv_3x3", "skip_connect"]))
    with pytest.raises(SupernetError, match=r"trained on search space 'tiny' .*bnas supernet SPACE"):
        load_supernet(out / SUPERNET_FILE, other)
    with pytest.raises(SupernetError, match="space_fingerprint"):
        train_supernet(other, out, epochs=2, resume=True)
    model_pt = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2)}, model_pt)
    with pytest.raises(SupernetError, match=r"model.pt is not a bnas supernet .*bnas supernet SPACE --out RUN"):
        load_supernet(model_pt)


def test_initial_supernet_is_where_training_starts(tmp_path: Path) -> None:
    space = load_space(space_file(tmp_path))
    # With a vanishing learning rate the weights stay where training started.
    still = train_supernet(space, None, epochs=1, seed=2, overrides={"optimizer.lr": 1e-12})
    start = initial_supernet(space, 2).state_dict()
    # BatchNorm's running statistics move with every forward pass; the weights must not.
    weights = {k: v for k, v in still.state_dict().items() if "running_" not in k and "num_batches" not in k}
    assert len(weights) > 10 and weights.keys() <= start.keys()
    assert all(torch.allclose(v, start[k], atol=1e-6) for k, v in weights.items())
    # A trained supernet's meta rebuilds the same start (seed 2, not the default 0).
    rebuilt = initial_of(still).state_dict()
    assert all(torch.equal(rebuilt[k], start[k]) for k in start)
    other = initial_supernet(space, 3).state_dict()
    assert any(not torch.equal(start[k], other[k]) for k in weights)
    trained = train_supernet(space, None, epochs=1, seed=2).state_dict()
    assert any(not torch.allclose(trained[k], start[k], atol=1e-3) for k in weights)


def test_path_angle_by_hand(tmp_path: Path) -> None:
    space = load_space(space_file(tmp_path))
    initial = initial_supernet(space, 0)
    genotype = initial.genotype({k: v[0] for k, v in initial._lists.items()}, name="first")
    assert path_angle(initial, initial, genotype) == pytest.approx(0.0, abs=1e-6)
    trained = copy.deepcopy(initial)
    with torch.no_grad():
        for weight in trained.parameters():
            weight.mul_(-3.0)  # the opposite direction: half a turn, whatever the length
    assert path_angle(trained, initial, genotype) == pytest.approx(math.pi, abs=1e-6)
    # Zero one conv weight of the path: the cosine is then |the rest| / |all| (by hand).
    trained = copy.deepcopy(initial)
    weights = [(n, w) for n, w in extract(initial, genotype).named_parameters() if w.dim() > 1]
    name, zeroed = next((n, w) for n, w in weights if w.dim() == 4)
    with torch.no_grad():
        dict(trained.network(genotype).named_parameters())[name].zero_()
    total = sum(float(w.detach().double().pow(2).sum()) for _, w in weights)
    left = total - float(zeroed.detach().double().pow(2).sum())
    assert path_angle(trained, initial, genotype) == pytest.approx(math.acos(math.sqrt(left / total)))
    # BatchNorm's affine parameters do not count.
    trained = copy.deepcopy(initial)
    affine = [w for w in trained.network(genotype).parameters() if w.dim() == 1]
    assert affine
    with torch.no_grad():
        for weight in affine:
            weight.add_(1.0)
    assert path_angle(trained, initial, genotype) == pytest.approx(0.0, abs=1e-6)


def test_loaded_supernet_scores_as_trained(tmp_path: Path) -> None:
    path = space_file(tmp_path)
    space = load_space(path)
    trained = train_supernet(space, tmp_path / "run", epochs=1)
    data = load_dataset("digits", val_fraction=0.1, seed=0)
    genotype = trained.genotype({k: v[-1] for k, v in trained._lists.items()})
    for loaded in (
        load_supernet(tmp_path / "run" / SUPERNET_FILE, space),
        load_supernet(tmp_path / "run" / SUPERNET_FILE),
    ):
        assert loaded.meta["epochs"] == 1 and loaded.meta["seed"] == 0 and loaded.meta["dataset"] == data.name
        assert loaded.space.fingerprint() == space.fingerprint()
        assert score(loaded, genotype, data) == score(trained, genotype, data)


def test_cli_trains_resumes_and_init_from_fine_tunes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = space_file(tmp_path)
    out = tmp_path / "run"
    assert main(["supernet", str(path), "--out", str(out), "--epochs", "1", "--quiet"]) == 0
    assert "bnas search" in capsys.readouterr().out
    assert main(["supernet", str(path), "--out", str(out), "--epochs", "2", "--resume", "--quiet"]) == 0
    assert state(out / SUPERNET_FILE)["epoch"] == 2
    assert main(["supernet", str(path), "--out", str(out), "--epochs", "0"]) == 2
    assert "--epochs must be positive" in capsys.readouterr().err
    # A genotype of the space, fine-tuned from its inherited weights for 0 further epochs...
    supernet = load_supernet(out / SUPERNET_FILE)
    genotype = supernet.genotype({k: v[0] for k, v in supernet._lists.items()}, name="first")
    genotype_file = tmp_path / "first.yaml"
    genotype.to_yaml(genotype_file)
    data = load_dataset("digits", val_fraction=0.1, seed=0)
    report = evaluate(
        genotype_file,
        "digits",
        data=data,
        overrides={"epochs": 1},
        initialise=supernet_initialiser(out / SUPERNET_FILE, load_genotype(genotype_file)),
    )
    assert report["init_from"] == str(out / SUPERNET_FILE)
    # ...starts from the supernet's weights: the inherited network's first-epoch accuracy
    # beats a random initialisation's on this learnable task.
    scratch = evaluate(genotype_file, "digits", data=data, overrides={"epochs": 1})
    assert report["history"][0]["val_acc"] > scratch["history"][0]["val_acc"]
    # A genotype outside the space cannot inherit.
    wide = replace(genotype, name="wide", stem=(replace(genotype.stem[0], channels=7),))
    wide_file = tmp_path / "wide.yaml"
    wide.to_yaml(wide_file)
    rc = main(["eval", str(wide_file), "--dataset", "digits", "--init-from", str(out / SUPERNET_FILE), "--quiet"])
    assert rc == 2
    assert "does not have" in capsys.readouterr().err


def test_extracted_weights_are_what_init_from_loads(tmp_path: Path) -> None:
    space = load_space(space_file(tmp_path))
    trained = train_supernet(space, tmp_path / "run", epochs=1)
    genotype = trained.genotype({k: v[-1] for k, v in trained._lists.items()}, name="deep")
    data = load_dataset("digits", val_fraction=0.1, seed=0)
    report = evaluate(
        genotype,
        "digits",
        data=data,
        overrides={"epochs": 1, "optimizer.lr": 1e-12},
        initialise=supernet_initialiser(tmp_path / "run" / SUPERNET_FILE, genotype),
        out=tmp_path / "eval",
    )
    model = extract(trained, genotype)
    tuned = torch.load(tmp_path / "eval" / "model.pt", weights_only=True)
    # With a vanishing learning rate the fine-tuned weights stay the inherited ones.
    conv = [k for k in tuned if k.endswith("weight") and tuned[k].dim() == 4]
    assert conv and all(torch.allclose(tuned[k], model.state_dict()[k], atol=1e-6) for k in conv)
    assert report["epochs_run"] == 1


def test_sliced_supernet_resumes_bit_identically_and_loads_sliced(tmp_path: Path) -> None:
    space = load_space(space_file(tmp_path))
    train_supernet(space, tmp_path / "straight", epochs=2, widths="sliced")
    train_supernet(space, tmp_path / "split", epochs=1, widths="sliced")
    with pytest.raises(SupernetError, match="widths 'sliced', not 'separate'"):
        train_supernet(space, tmp_path / "split", epochs=2, resume=True)
    train_supernet(space, tmp_path / "split", epochs=2, resume=True, widths="sliced")
    same_weights(state(tmp_path / "straight" / SUPERNET_FILE), state(tmp_path / "split" / SUPERNET_FILE))
    loaded = load_supernet(tmp_path / "split" / SUPERNET_FILE)
    assert loaded.widths == "sliced" and loaded.meta["widths"] == "sliced" and loaded._tied > 0
    # The loaded narrower tensors are views of the widest again, holding the saved values.
    saved = state(tmp_path / "split" / SUPERNET_FILE)["model"]
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert loaded.num_params() < sum(p.numel() for p in loaded.parameters())


def test_entangled_supernet_resumes_bit_identically_and_loads_entangled(tmp_path: Path) -> None:
    space = load_space(space_file(tmp_path, ops=["binary_conv_3x3", "binary_conv_5x5", "skip_connect"]))
    train_supernet(space, tmp_path / "straight", epochs=2, kernels="entangled")
    out = tmp_path / "split"
    assert (
        main(["supernet", str(space.source), "--out", str(out), "--epochs", "1", "--kernels", "entangled", "--quiet"])
        == 0
    )
    with pytest.raises(SupernetError, match="kernels 'entangled', not 'separate'.*--kernels"):
        train_supernet(space, out, epochs=2, resume=True)
    train_supernet(space, out, epochs=2, resume=True, kernels="entangled")
    same_weights(state(tmp_path / "straight" / SUPERNET_FILE), state(out / SUPERNET_FILE))
    loaded = load_supernet(out / SUPERNET_FILE)
    assert loaded.kernels == "entangled" and loaded.meta["kernels"] == "entangled" and loaded._tied > 0
    saved = state(out / SUPERNET_FILE)["model"]
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, saved[key]), key
    # Trained tied: every saved 3x3 kernel is its 5x5's centre.
    threes = [k for k in saved if "/binary_conv_3x3/" in k and k.endswith("conv.weight")]
    assert threes
    for key in threes:
        assert torch.equal(saved[key], saved[key.replace("binary_conv_3x3", "binary_conv_5x5")][:, :, 1:4, 1:4]), key
    # The angle's starting point is the entangled supernet the training started from.
    initial = initial_of(loaded)
    assert initial.kernels == "entangled" and initial._tied == loaded._tied
    fresh = initial_supernet(space, 0, kernels="entangled").state_dict()
    assert all(torch.equal(value, fresh[key]) for key, value in initial.state_dict().items())
