"""Data and trainer: learning, exact resume, NaN handling, recipe rules, clear errors."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

import pytest
import torch
from torch import nn

import bnas
from bnas.binarize import BinarizeConfig, BinaryLinear
from bnas.cli import main
from bnas.data import DataError, load_dataset
from bnas.evaluate import evaluate
from bnas.genotype import loads_genotype
from bnas.train import (
    Recipe,
    Trainer,
    TrainingError,
    load_checkpoint,
    lr_factor,
    make_optimizer,
    param_groups,
    seed_everything,
    task_loss,
)
from bnas.train import loop as train_loop

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MLP = """
name: digits_mlp
input: [1, 8, 8]
num_classes: 10
stem:
  - {op: flatten}
body:
  - {op: binary_linear, channels: 64, binarize: {activation: none, weight: sign, latent_clip: glorot}, dropout: 0.2}
  - {op: binary_linear, channels: 64, dropout: 0.2}
head:
  - {op: linear}
training:
  optimizer: {name: adam, lr: 0.01}
  batch_size: 64
  epochs: 3
"""


def test_short_digits_run_learns() -> None:
    report = evaluate(loads_genotype(MLP), "digits", progress=False)
    assert report["test_acc"] > 0.6  # chance is 0.1
    assert report["best_val_acc"] > 0.6
    assert len(report["history"]) == 3


def test_digits_splits_are_disjoint_and_seeded() -> None:
    a = load_dataset("digits", seed=3)
    b = load_dataset("digits", seed=3)
    c = load_dataset("digits", seed=4)
    assert torch.equal(a.val_x, b.val_x) and not torch.equal(a.val_x, c.val_x)
    train = {tuple(x.flatten().tolist()) for x in a.train_x}
    val = {tuple(x.flatten().tolist()) for x in a.val_x}
    test = {tuple(x.flatten().tolist()) for x in a.test_x}
    # digits has a few duplicate images; the index split itself is disjoint, so overlaps stay tiny.
    assert len(train & test) < 10 and len(val & test) < 5
    assert len(a.train_x) + len(a.val_x) + len(a.test_x) == 1797


def _run(out: Path, interrupt_at_step: int | None = None) -> nn.Module:
    genotype = loads_genotype(MLP)
    recipe = Recipe.from_dict(genotype.training)
    data = load_dataset("digits", seed=0)
    seed_everything(recipe.seed)
    model = bnas.build(genotype)
    trainer = Trainer(model, data, recipe, out_dir=out, progress=False)
    if interrupt_at_step is not None:
        calls = {"n": 0}

        def interrupt(module: nn.Module, args: object) -> None:
            calls["n"] += 1
            if calls["n"] == interrupt_at_step:
                raise KeyboardInterrupt

        handle = model.register_forward_pre_hook(interrupt)
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
        handle.remove()
        # A fresh process: new model, new trainer, resume from the checkpoint.
        seed_everything(12345)
        model = bnas.build(genotype)
        trainer = Trainer(model, data, recipe, out_dir=out, progress=False)
        assert trainer.resume()
    trainer.fit()
    return model


def test_resume_after_interrupt_gives_identical_weights(tmp_path: Path) -> None:
    reference = _run(tmp_path / "a")
    # Interrupt mid-epoch 2 (21 train steps per epoch plus one validation forward per epoch).
    resumed = _run(tmp_path / "b", interrupt_at_step=30)
    for (name, p), (_, q) in zip(reference.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


def test_nan_loss_stops_cleanly_and_keeps_checkpoint(tmp_path: Path) -> None:
    genotype = loads_genotype(MLP)
    recipe = Recipe.from_dict(genotype.training)
    model = bnas.build(genotype)
    trainer = Trainer(model, load_dataset("digits"), recipe, out_dir=tmp_path, progress=False)
    state = {"epoch": 0}
    trainer.callbacks.append(lambda epoch, row: state.update(epoch=epoch))

    def poison(module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor | None:
        return out * float("nan") if state["epoch"] >= 1 and module.training else None

    model.head.register_forward_hook(poison)
    with pytest.raises(TrainingError, match="the loss became nan at epoch 2, step 1.*last good checkpoint"):
        trainer.fit()
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_schedules_and_warmup() -> None:
    r = Recipe.from_dict({"epochs": 10, "schedule": {"name": "cosine", "warmup_epochs": 2}})
    assert lr_factor(r, 0) == pytest.approx(1 / 3) and lr_factor(r, 1) == pytest.approx(2 / 3)
    assert lr_factor(r, 2) == pytest.approx(1.0)
    assert lr_factor(r, 6) == pytest.approx(0.5)
    step = Recipe.from_dict({"epochs": 10, "schedule": {"name": "step", "step_size": 3, "gamma": 0.5}})
    assert [lr_factor(step, e) for e in (0, 3, 6)] == pytest.approx([1, 0.5, 0.25])
    lin = Recipe.from_dict({"epochs": 4, "schedule": {"name": "linear"}})
    assert lr_factor(lin, 2) == pytest.approx(0.5)


def test_squared_hinge_loss_formula() -> None:
    logits = torch.tensor([[0.5, -2.0, 0.0]])
    y = torch.tensor([0])
    r = Recipe.from_dict({"loss": "squared_hinge"})
    # targets (+1, -1, -1): max(0, 1 - t*y)^2 = 0.25, 0, 1 -> mean 1.25 / 3
    assert task_loss(logits, y, r).item() == pytest.approx(1.25 / 3)


def test_weight_decay_only_where_it_belongs() -> None:
    model = bnas.build(loads_genotype(MLP))
    recipe = Recipe.from_dict({"optimizer": {"name": "sgd", "lr": 0.1, "weight_decay": 1e-4}})
    groups = param_groups(model, recipe)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    latent = {id(layer.weight) for layer in bnas.binarize.binary_layers(model)}
    for p in model.parameters():
        if p.dim() == 1 or id(p) in latent:
            assert id(p) not in decayed
    head = model.head[0].weight
    assert id(head) in decayed
    # BinaryNet's glorot learning-rate scale reaches the first layer's weights only.
    scales = {g["lr_scale"] for g in groups}
    assert len(scales) == 2


def test_glorot_lr_scale_reaches_the_optimizer() -> None:
    layer = BinaryLinear(100, 50, config=BinarizeConfig("ste", "sign", latent_clip="glorot"))
    h = math.sqrt(1.5 / 150)
    model = nn.Sequential(layer, nn.BatchNorm1d(50))
    recipe = Recipe.from_dict({"optimizer": {"name": "sgd", "lr": 0.1}})
    groups = param_groups(model, recipe)
    assert sorted(g["lr_scale"] for g in groups) == pytest.approx([1.0, 1 / h])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # The scaled group holds the latent weight, and its learning rate is scaled from the first step.
    scaled = next(g for g in make_optimizer(model, recipe).param_groups if g["lr_scale"] != 1.0)
    assert [id(p) for p in scaled["params"]] == [id(layer.weight)]
    assert scaled["lr"] == pytest.approx(0.1 / h)


def test_recipe_errors() -> None:
    with pytest.raises(TrainingError, match="unknown recipe key"):
        Recipe.from_dict({"epoch": 3})
    with pytest.raises(TrainingError, match="optimizer.lr: expected a positive number"):
        Recipe.from_dict({"optimizer": {"name": "adam", "lr": -1}})


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match="unknown dataset 'mnsit'; did you mean 'mnist'"):
        load_dataset("mnsit")


def test_missing_data_root_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "looked in" in message and "To get the data" in message


def test_input_shape_mismatch(capsys: pytest.CaptureFixture[str]) -> None:
    path = REPO / "search_spaces" / "genotypes" / "binary_lenet5.yaml"
    assert main(["eval", str(path), "--dataset", "digits", "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "takes input [1, 28, 28] but dataset 'digits' gives [1, 8, 8]" in err


def test_eval_writes_report_and_resume_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = tmp_path / "mlp.yaml"
    g.write_text(MLP)
    out = tmp_path / "run"
    assert main(["eval", str(g), "--epochs", "2", "--out", str(out), "--quiet"]) == 0
    import json

    report = json.loads((out / "report.json").read_text())
    assert {"test_acc", "best_val_acc", "history", "metrics", "recipe", "genotype", "versions", "wall_time_s"} <= set(
        report
    )
    assert report["recipe"]["epochs"] == 2
    assert (out / "report.md").read_text().startswith("# digits_mlp on digits")
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", str(g), "--epochs", "2", "--out", str(out), "--quiet"]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_synthetic_dataset_matches_genotype_shape() -> None:
    data = load_dataset("synthetic", shape=(3, 6, 6), num_classes=4)
    assert data.input_shape == (3, 6, 6) and data.num_classes == 4


@pytest.mark.skipif(not (SHARED / "MNIST" / "raw").is_dir(), reason="shared/data/MNIST not beside the repo")
def test_mnist_from_gzipped_idx() -> None:
    data = load_dataset("mnist", SHARED, val_fraction=0.1)
    assert data.input_shape == (1, 28, 28)
    assert len(data.train_x) + len(data.val_x) == 60000 and len(data.test_x) == 10000
    assert data.train_x.dtype == torch.uint8
    assert 0.12 < data.mean.item() < 0.14


def test_distillation_from_a_real_valued_teacher(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher.yaml"
    teacher.write_text(MLP)
    genotype = loads_genotype(MLP)
    report = evaluate(
        genotype,
        "digits",
        progress=False,
        out=tmp_path / "run",
        overrides={"epochs": 2, "distill": {"teacher": str(teacher), "temperature": 2.0, "alpha": 0.5}},
    )
    # The teacher (binarization off) was trained first, then distilled into the binary net.
    assert (tmp_path / "run" / "teacher" / "checkpoint.pt").is_file()
    teacher_state = load_checkpoint(tmp_path / "run" / "teacher" / "checkpoint.pt")
    assert teacher_state["epoch"] == 2
    assert report["test_acc"] > 0.5


def test_two_step_schedule_binarizes_weights_later() -> None:
    genotype = loads_genotype(MLP)
    recipe = Recipe.from_dict({**genotype.training, "two_step": 1, "epochs": 2})
    model = bnas.build(genotype)
    layers = list(bnas.binarize.binary_layers(model))
    assert len(layers) == 2
    seen: list[list[tuple[bool, bool]]] = []
    trainer = Trainer(model, load_dataset("digits"), recipe, progress=False)
    # Every binary layer, after each epoch: (activations binarized, weights binarized).
    trainer.callbacks.append(
        lambda epoch, row: seen.append(
            [(layer.input_quantizer.enabled, layer.kernel_quantizer.enabled) for layer in layers]
        )
    )
    trainer.fit()
    assert seen == [[(True, False)] * len(layers), [(True, True)] * len(layers)]


def test_patience_stops_early_by_the_lenet_rule() -> None:
    genotype = loads_genotype(MLP)
    recipe = Recipe.from_dict(
        {
            **genotype.training,
            "epochs": 30,
            "patience": 2,
            "patience_increase": 1.0,
            "optimizer": {"name": "adam", "lr": 1e-9},
        }
    )
    result = Trainer(bnas.build(genotype), load_dataset("digits"), recipe, progress=False).fit()
    # With a learning rate too small to improve anything, patience is never extended.
    assert result.stopped_early and result.epochs_run == 2


# Validation accuracy after epochs 1, 2, ...: clear improvements at 1-3 and 5, and one at 8 too small
# for the 0.995 improvement threshold (error 0.1995 against 0.2 x 0.995 = 0.199), then none.
VAL_SCRIPT = [0.5, 0.6, 0.7, 0.7, 0.8, 0.8, 0.8, 0.8005] + [0.8005] * 22


def _scripted_trainer(monkeypatch: pytest.MonkeyPatch, recipe: Recipe, out: Path | None = None) -> Trainer:
    """A trainer on digits whose validation accuracy after epoch e is VAL_SCRIPT[e - 1]."""
    trainer = Trainer(bnas.build(loads_genotype(MLP)), load_dataset("digits"), recipe, out_dir=out, progress=False)
    # Keyed by the trainer's own history, so a resumed trainer continues the script where it stopped.
    monkeypatch.setattr(
        train_loop, "evaluate_accuracy", lambda model, loader, device: (VAL_SCRIPT[len(trainer.history)], 1.0)
    )
    return trainer


def _patience_recipe(patience_increase: float, epochs: int = 30) -> Recipe:
    return Recipe.from_dict(
        {**loads_genotype(MLP).training, "epochs": epochs, "patience": 2, "patience_increase": patience_increase}
    )


# Stop after epoch e once e >= patience; an improvement at epoch e raises patience to
# max(patience, ceil(e * patience_increase)). Patience starts at 2:
#   1.0: epoch 2 improves -> max(2, 2) = 2 -> stops after epoch 2;
#   1.5: epochs 1-3 -> 2, 3, ceil(4.5) = 5; epoch 5 -> ceil(7.5) = 8 -> stops after epoch 8;
#   2.0: epochs 1-3 -> 2, 4, 6; epoch 5 -> 10; epoch 8's small gain would make it 16 -> stops after epoch 10.
# Epoch 8's gain is still the best accuracy, so it is the best epoch once the run reaches it.
@pytest.mark.parametrize(("patience_increase", "stop_epoch", "best_epoch"), [(1.0, 2, 2), (1.5, 8, 8), (2.0, 10, 8)])
def test_patience_increase_extends_patience(
    monkeypatch: pytest.MonkeyPatch, patience_increase: float, stop_epoch: int, best_epoch: int
) -> None:
    result = _scripted_trainer(monkeypatch, _patience_recipe(patience_increase)).fit()
    assert result.stopped_early and result.epochs_run == stop_epoch
    assert [row["val_acc"] for row in result.history] == VAL_SCRIPT[:stop_epoch]
    assert result.best_epoch == best_epoch and result.best_val_acc == VAL_SCRIPT[best_epoch - 1]


@pytest.mark.parametrize("how", ["epochs_extended", "ctrl_c_mid_epoch"])
def test_extended_patience_survives_resume(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, how: str) -> None:
    reference = _scripted_trainer(monkeypatch, _patience_recipe(2.0)).fit()
    assert reference.epochs_run == 10
    out = tmp_path / "run"
    if how == "epochs_extended":
        # A run of 5 epochs ends with patience 10 (raised at epoch 5); it is then extended to 30.
        first = _scripted_trainer(monkeypatch, _patience_recipe(2.0, epochs=5), out).fit()
        assert not first.stopped_early and first.epochs_run == 5
    else:
        # Ctrl-C at the 4th step of epoch 7, after patience was raised to 10 at epoch 5.
        trainer = _scripted_trainer(monkeypatch, _patience_recipe(2.0), out)

        def interrupt(module: nn.Module, args: object) -> None:
            if trainer.epoch == 6 and trainer.step_in_epoch == 3:
                raise KeyboardInterrupt

        trainer.model.register_forward_pre_hook(interrupt)
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["patience"] == 10
    resumed = _scripted_trainer(monkeypatch, _patience_recipe(2.0), out)
    assert resumed.resume()
    result = resumed.fit()
    # Had the resumed run fallen back to the recipe's patience of 2, it would stop at once (epoch 6 or 7).
    assert result.stopped_early and result.epochs_run == reference.epochs_run == 10
    assert result.best_epoch == reference.best_epoch == 8
    assert [row["val_acc"] for row in result.history] == [row["val_acc"] for row in reference.history]


def _allocator_probe(env: dict[str, str]) -> list[str]:
    """Run tune_cpu_allocator in a fresh process (it changes process-wide malloc settings)."""
    import subprocess
    import sys

    code = "from bnas.train import tune_cpu_allocator as t\nprint(t(), t(), t(enable=False))\n"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_cpu_allocator_tuning_is_switchable() -> None:
    # Tuned (idempotent on a second call), then restored to glibc's defaults.
    assert _allocator_probe({"BNAS_MALLOC_TUNE": "1"}) == ["True", "True", "False"]
    # The environment switch turns it off for users who want glibc's defaults.
    assert _allocator_probe({"BNAS_MALLOC_TUNE": "0"})[:2] == ["False", "False"]
