"""The training recipe: a genotype's ``training:`` section, a search space's ``budget:``.

Every key is optional; the defaults are those of ``bnas.train.Recipe``, which validates
with this schema. Messages read ``<where>.<key>: expected <what>, got <value>``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import ConfigDict, Field, Strict, model_validator

from .common import PositiveInt, Schema, StrictStr, TrueOrFalse, expect, fail, no_default_in_schema

__all__ = ["LOSSES", "OPTIMIZERS", "SCHEDULES", "Distill", "Optimizer", "RecipeSchema", "Schedule"]

OptimizerName = Literal["adam", "adamw", "sgd"]
ScheduleName = Literal["cosine", "linear", "step", "exponential", "constant"]
LossName = Literal["cross_entropy", "squared_hinge"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)
LOSSES: tuple[str, ...] = get_args(LossName)

PositiveNumber = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False), expect("a positive number")]
NonNegative = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False), expect("a number >= 0")]
UnitOpen = Annotated[float, Strict(), Field(ge=0, lt=1, allow_inf_nan=False), expect("a number in [0, 1)")]
CheckpointPath = Annotated[StrictStr, expect("the path of the teacher's checkpoint")]
NonNegInt = Annotated[int, Strict(), Field(ge=0), expect("an integer >= 0")]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Section(Schema):
    """A mapping inside the recipe: its unknown keys are all listed, at the mapping."""

    unknown_style: ClassVar[Literal["each", "all"]] = "all"


class Optimizer(_Section):
    """The optimiser: `{name: adam | adamw | sgd, lr, weight_decay, betas, eps}`; SGD also
    takes `momentum` and `nesterov`."""

    not_a_mapping: ClassVar[str] = "expected a mapping {name: " + "|".join(OPTIMIZERS) + ", lr: ...}, got {got}"

    name: Annotated[OptimizerName, expect(" or ".join(OPTIMIZERS))] = Field(
        "adam", description="adam, adamw (decoupled weight decay) or sgd."
    )
    lr: PositiveNumber = Field(1e-3, description="The learning rate (before the schedule's factor).")
    weight_decay: NonNegative = Field(
        0.0,
        description="L2 weight decay; never applied to BatchNorm, biases and other 1-D parameters, "
        "nor to binary layers' latent weights unless decay_binary_weights.",
    )
    momentum: UnitOpen = Field(0.9, description="SGD momentum, in [0, 1).")
    nesterov: TrueOrFalse = Field(False, description="Nesterov momentum (SGD).")
    betas: Annotated[tuple[UnitOpen, UnitOpen], expect("two numbers in [0, 1)", whole=True)] = Field(
        (0.9, 0.999), description="Adam's (beta1, beta2), each in [0, 1)."
    )
    eps: PositiveNumber = Field(1e-8, description="Adam's epsilon.")


class Schedule(_Section):
    """The learning-rate schedule: a factor of the epoch, applied at the start of each epoch."""

    not_a_mapping: ClassVar[str] = "expected a mapping {name: " + "|".join(SCHEDULES) + "}, got {got}"

    name: Annotated[ScheduleName, expect(" or ".join(SCHEDULES))] = Field(
        "cosine",
        description="cosine and linear decay to final_lr; exponential decays geometrically to final_lr; "
        "step multiplies by gamma every step_size epochs; constant keeps lr.",
    )
    warmup_epochs: NonNegInt = Field(0, description="Epochs of linear warm-up before the schedule.")
    # Absent means the schedule's own default; an explicit null is still refused (pydantic
    # validates given values, not the default).
    final_lr: NonNegative = Field(  # type: ignore[assignment]
        None,
        json_schema_extra=no_default_in_schema,
        description="The learning rate the schedule ends at: default 0 for cosine and linear, "
        "1e-6 for exponential (which needs it positive).",
    )
    step_size: Annotated[int, Strict(), Field(gt=0), expect("a positive integer")] = Field(
        30, description="The step schedule's period in epochs."
    )
    gamma: PositiveNumber = Field(0.1, description="The step schedule's factor.")

    @classmethod
    def check_keys(cls, data: dict[Any, Any]) -> None:
        super().check_keys(data)
        # On the value as written: the model holds final_lr as a float ("got 0.0" for 0).
        final_lr = data.get("final_lr")
        if data.get("name") == "exponential" and _is_number(final_lr) and final_lr <= 0:  # type: ignore[operator]
            raise fail(f"expected a positive number for the exponential schedule, got {final_lr!r}", "final_lr")


class Distill(_Section):
    """Knowledge distillation from a real-valued teacher:
    loss = (1 - alpha) * task loss + alpha * T^2 * KL(teacher_T || student_T)."""

    not_a_mapping: ClassVar[str] = (
        "expected {teacher: GENOTYPE.yaml, checkpoint: PATH, temperature: T, alpha: A}, got {got}"
    )
    missing: ClassVar[dict[str, str]] = {"teacher": "expected the path of a teacher genotype YAML, got None"}

    teacher: Annotated[StrictStr, Field(min_length=1), expect("the path of a teacher genotype YAML")] = Field(
        description="The teacher's genotype YAML (built with binarization off)."
    )
    # Absent: the teacher is trained first. An explicit null is refused, as for final_lr.
    checkpoint: CheckpointPath = Field(  # type: ignore[assignment]
        None,
        json_schema_extra=no_default_in_schema,
        description="The teacher's trained checkpoint; without it the teacher is trained first, with this recipe.",
    )
    temperature: PositiveNumber = Field(4.0, description="The distillation temperature T.")
    alpha: Annotated[float, Strict(), Field(ge=0, le=1, allow_inf_nan=False), expect("a number in [0, 1]")] = Field(
        0.9, description="The weight of the distillation term, in [0, 1]."
    )


class RecipeSchema(_Section):
    """The training recipe (`bnas.train.Recipe`); every key is optional."""

    model_config = ConfigDict(title="Recipe")
    not_a_mapping: ClassVar[str] = "expected a mapping of recipe keys, got {type}"
    unknown_label: ClassVar[str] = "recipe key(s)"

    optimizer: Optimizer = Field(
        Optimizer.model_validate({}),
        json_schema_extra={"default": {"name": "adam", "lr": 0.001}},
        description="{name: adam | adamw | sgd, lr, weight_decay, betas, eps, momentum, nesterov}; "
        "default {name: adam, lr: 0.001}.",
    )
    schedule: Schedule = Field(
        Schedule.model_validate({}),
        json_schema_extra={"default": {"name": "cosine"}},
        description="{name: cosine | linear | step | exponential | constant, warmup_epochs, final_lr, step_size, "
        "gamma}; default cosine.",
    )
    epochs: PositiveInt = Field(10, description="Training epochs.")
    batch_size: PositiveInt = Field(64, description="Images per step.")
    loss: Annotated[LossName, expect(" or ".join(LOSSES))] = Field(
        "cross_entropy",
        description="cross_entropy, or squared_hinge (BinaryNet: mean(max(0, 1 - t * logits)^2), t = +-1).",
    )
    label_smoothing: UnitOpen = Field(0.0, description="Label smoothing for cross_entropy, in [0, 1).")
    decay_binary_weights: TrueOrFalse = Field(
        False,
        description="Also decay the latent weights of binary layers (off: decay pulls them to 0, "
        "where their sign flips on noise).",
    )
    two_step: Annotated[
        int, Strict(), Field(ge=0), expect("an integer >= 0 (epochs before the weights are binarized)")
    ] = Field(
        0,
        description="Epochs with binary activations and real weights before the weights are binarized "
        "too (ReActNet's two-step schedule); 0 = off.",
    )
    distill: Distill | None = Field(
        None,
        description="{teacher: GENOTYPE.yaml, checkpoint: PATH, temperature: 4, alpha: 0.9}: knowledge "
        "distillation from a real-valued teacher; null = off.",
    )
    patience: Annotated[int, Strict(), Field(gt=0), expect("a positive integer or null")] | None = Field(
        None, description="Early stopping on validation accuracy, in epochs (LeNet-5 tutorial rule); null = off."
    )
    patience_increase: Annotated[float, Strict(), Field(ge=1, allow_inf_nan=False), expect("a number >= 1")] = Field(
        2.0, description="A clear improvement at epoch e raises patience to max(patience, e * patience_increase)."
    )
    improvement_threshold: Annotated[
        float, Strict(), Field(gt=0, le=1, allow_inf_nan=False), expect("a number in (0, 1]")
    ] = Field(0.995, description="An epoch improves clearly when its validation error is below this x the best so far.")
    seed: NonNegInt = Field(0, description="Seeds Python, NumPy and torch; CPU runs repeat bit for bit.")
    amp: TrueOrFalse = Field(True, description="bfloat16 autocast on CUDA (ignored on CPU).")
    val_fraction: UnitOpen = Field(0.1, description="The share of the training set held out for validation, in [0, 1).")

    @model_validator(mode="after")
    def _smoothing_is_for_cross_entropy(self) -> RecipeSchema:
        if self.label_smoothing and self.loss != "cross_entropy":
            raise fail(
                f"expected 0 with the squared_hinge loss (it applies to cross_entropy), got {self.label_smoothing!r}",
                "label_smoothing",
            )
        return self
