"""Typed autoencoder configuration and the named presets."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from data.errors import ParameterError

Activation = Literal["relu", "elu", "gelu", "selu", "tanh", "linear", "sigmoid"]


class AutoencoderConfig(BaseModel):
    """Everything that decides how the autoencoder is built and trained."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale_inputs: bool = Field(True, description="Standardise features with statistics learnt from training rows (saved in the model).")
    encoder_units: list[int] = Field(default=[64, 32, 24], min_length=1, description="Units of each encoder layer; the last is the bottleneck.")
    decoder_units: list[int] = Field(default=[32, 64], description="Units of each hidden decoder layer; the output layer always has one unit per feature.")
    activation: Activation = Field("relu", description="Activation of the hidden layers.")
    output_activation: Activation = Field("linear", description="Activation of the output layer.")
    loss: Literal["mse", "mae"] = Field("mse", description="Training loss; the per-row reconstruction error uses the same measure.")
    optimizer: Literal["adam", "adamw", "rmsprop", "sgd"] = Field("adam", description="Optimizer.")
    learning_rate: float = Field(5e-3, gt=0, le=1, description="Optimizer learning rate.")
    epochs: int = Field(60, ge=1, le=10_000, description="Most training epochs.")
    batch_size: int = Field(1024, ge=1, le=1_000_000, description="Rows per training step.")
    early_stopping_patience: int | None = Field(4, ge=1, description="Stop after this many epochs without validation improvement; None trains every epoch.")
    validation_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="Share of training rows used only to decide early stopping.")
    seed: int = Field(42, description="Seed for weights, shuffling and splits.")


PRESETS: dict[str, AutoencoderConfig] = {
    # Standardised inputs, a linear output and a bottleneck wide enough for independent features.
    "default": AutoencoderConfig(),
    # The tutorial's recipe as published: unscaled inputs, 4-unit bottleneck, sigmoid output, MAE, 20 epochs.
    "seed": AutoencoderConfig(
        scale_inputs=False,
        encoder_units=[16, 8, 4],
        decoder_units=[8, 16],
        activation="relu",
        output_activation="sigmoid",
        loss="mae",
        optimizer="adam",
        learning_rate=1e-3,
        epochs=20,
        batch_size=64,
        early_stopping_patience=None,
        validation_fraction=0.0,
    ),
}


def resolve_preset(name: str, **overrides: object) -> AutoencoderConfig:
    """Return the preset called ``name`` with any non-None ``overrides`` applied and validated."""
    if name not in PRESETS:
        raise ParameterError(f"preset={name!r} is unknown; choose one of: {', '.join(sorted(PRESETS))}")
    changes = {key: value for key, value in overrides.items() if value is not None}
    if not changes:
        return PRESETS[name]
    try:
        return AutoencoderConfig.model_validate({**PRESETS[name].model_dump(), **changes})
    except ValueError as exc:
        raise ParameterError(f"preset {name!r} with overrides {changes}: {exc}") from exc
