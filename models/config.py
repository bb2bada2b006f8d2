"""Typed autoencoder configuration and the named presets."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from data.errors import ParameterError

Activation = Literal["relu", "elu", "gelu", "selu", "tanh", "linear", "sigmoid"]
Auto = Literal["auto"]
Widths = Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)]

MAX_AUTO_WIDTH = 512
MIN_AUTO_BATCH, MAX_AUTO_BATCH, ROWS_PER_AUTO_BATCH = 32, 1024, 50
AUTO_ENSEMBLE_SIZE = 3
# Below this many training rows a set is small: an ensemble averages away the random start, and training runs
# its full epochs. There the validation loss stops improving long before the ranking of anomalies does (on the
# ADBench sets 200 epochs ranked 0.015 ROC-AUC higher on average than early stopping), and holding out
# validation rows only costs rows.
SMALL_SET_ROWS = 20_000
SMALL_SET_EPOCHS, LARGE_SET_EPOCHS, LARGE_SET_PATIENCE = 200, 60, 4
# Decorrelate when at least this share of the features are exact linear combinations of the others: derived
# columns (totals, differences) then count several times over, and a row that breaks the relation is seen only
# through decorrelated inputs. On real tables without such columns standardised inputs ranked anomalies better.
AUTO_DECORRELATE_SHARE = 0.1


class AutoencoderConfig(BaseModel):
    """Everything that decides how the autoencoder is built and trained."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale_inputs: bool = Field(
        True, description="Standardise features with statistics learnt from training rows (saved in the model)."
    )
    decorrelate_inputs: bool | Auto = Field(
        "auto",
        description=(
            "After standardising (needs scale_inputs), also whiten the features (ZCA, in the model), so that features "
            "that move together weigh once and a broken correlation shows in the error. 'auto': only when at least a "
            "tenth of the features are exact linear combinations of others, or every feature is close to Gaussian."
        ),
    )
    whitening_floor: float = Field(
        0.1,
        gt=0,
        description=(
            "Added to each eigenvalue of the correlation matrix before whitening (their mean is 1): 0.1 whitens fully, "
            "amplifying directions of little variance up to 3x and damping exact combinations; 1 shrinks directions "
            "many features share and never amplifies any."
        ),
    )
    input_dropout: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description=(
            "Share of inputs zeroed at random while training, so the network learns each feature from the others "
            "instead of copying it; an offset on one feature then stays in that feature's residual."
        ),
    )
    encoder_units: Widths | Auto = Field(
        "auto",
        description=(
            "Units of each encoder layer; the last is the bottleneck. 'auto': 2d, d and 3d/4 for d features "
            "(at most 512)."
        ),
    )
    decoder_units: list[Annotated[int, Field(ge=1)]] | Auto = Field(
        "auto",
        description=(
            "Units of each hidden decoder layer; the output layer always has one unit per feature. 'auto': the "
            "encoder's in reverse, bottleneck left out."
        ),
    )
    ensemble_size: Annotated[int, Field(ge=1, le=16)] | Auto = Field(
        "auto",
        description=(
            "Autoencoders trained side by side whose errors are averaged: the score varies less with their random "
            "start. 'auto': 3 below 20,000 training rows, where that variance is largest, else 1."
        ),
    )
    activation: Activation = Field("relu", description="Activation of the hidden layers.")
    output_activation: Activation = Field("linear", description="Activation of the output layer.")
    loss: Literal["mse", "mae"] = Field(
        "mse", description="Training loss; the per-row reconstruction error uses the same measure."
    )
    optimizer: Literal["adam", "adamw", "rmsprop", "sgd"] = Field("adam", description="Optimizer.")
    learning_rate: float = Field(5e-3, gt=0, le=1, description="Optimizer learning rate.")
    gradient_clip_norm: Annotated[float, Field(gt=0)] | None = Field(
        None,
        description=(
            "Clip each step's gradient to this norm (None: no clipping); a fit that diverges is retried with clipping "
            "and a smaller learning rate."
        ),
    )
    epochs: Annotated[int, Field(ge=1, le=10_000)] | Auto = Field(
        "auto",
        description="Most training epochs (passes over the training rows). 'auto': 200 below 20,000 training rows, "
        "each trained, else 60 with early stopping.",
    )
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)] | Auto = Field(
        "auto", description="Rows per training step. 'auto': a fiftieth of the training rows, between 32 and 1024."
    )
    early_stopping_patience: Annotated[int, Field(ge=1)] | Auto | None = Field(
        "auto",
        description="Stop after this many epochs without validation improvement; None trains every epoch. 'auto': "
        "None below 20,000 training rows, else 4.",
    )
    validation_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=0.5,
        description=(
            "Share of training rows used only to decide early stopping; without early stopping none is held out."
        ),
    )
    seed: int = Field(42, description="Seed for weights, shuffling and splits.")
    categorical_columns: list[tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=2)]]] = Field(
        default_factory=list,
        description=(
            "(column, slots) of each categorical feature, set from the training data: the model one-hot encodes "
            "its codes into its vocabulary's slots and one for values unseen in training."
        ),
    )

    def sized_for(
        self, rows: int, features: int, linear_dependencies: int = 0, gaussian_like: bool = False
    ) -> AutoencoderConfig:
        """Return this config with every 'auto' setting sized for ``rows`` training rows of ``features`` features.

        ``linear_dependencies`` of the features are exact combinations; ``gaussian_like``: every feature's
        distribution is close to a Gaussian's.
        """
        encoder = self.encoder_units
        if encoder == "auto":
            encoder = [min(MAX_AUTO_WIDTH, max(2, round(features * share))) for share in (2.0, 1.0, 0.75)]
        decoder = list(reversed(encoder[:-1])) if self.decoder_units == "auto" else self.decoder_units
        batch = self.batch_size
        if batch == "auto":
            batch = min(MAX_AUTO_BATCH, max(MIN_AUTO_BATCH, rows // ROWS_PER_AUTO_BATCH))
        small = rows < SMALL_SET_ROWS
        epochs = self.epochs
        if epochs == "auto":
            epochs = SMALL_SET_EPOCHS if small else LARGE_SET_EPOCHS
        patience = self.early_stopping_patience
        if patience == "auto":
            patience = None if small else LARGE_SET_PATIENCE
        members = self.ensemble_size
        if members == "auto":
            members = AUTO_ENSEMBLE_SIZE if small else 1
        decorrelate = self.decorrelate_inputs
        if decorrelate == "auto":
            # For a Gaussian normal class whitening is the optimal transform: the error then measures the
            # Mahalanobis distance the limit ranks by.
            decorrelate = gaussian_like or linear_dependencies >= max(1.0, AUTO_DECORRELATE_SHARE * features)
        return self.model_copy(
            update={
                "epochs": epochs,
                "encoder_units": encoder,
                "decoder_units": decoder,
                "batch_size": batch,
                "early_stopping_patience": patience,
                "ensemble_size": members,
                "decorrelate_inputs": decorrelate,
            }
        )


PresetName = Literal["default", "seed"]
PRESET_NAMES: tuple[str, ...] = get_args(PresetName)

PRESETS: dict[str, AutoencoderConfig] = {
    # Standardised inputs (decorrelated only where many features are exact combinations of others), with
    # input dropout so that each feature is predicted from the others rather than copied, by an
    # ensemble of autoencoders on smaller sets; a linear output; widths from the
    # feature count, batch size and patience from the training rows, so that a few hundred rows train
    # as well as millions.
    "default": AutoencoderConfig(),
    # The tutorial's recipe as published: unscaled inputs, 4-unit bottleneck, sigmoid output, MAE, 20 epochs.
    "seed": AutoencoderConfig(
        scale_inputs=False,
        decorrelate_inputs=False,
        input_dropout=0.0,
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
        ensemble_size=1,
    ),
}


# Recipes a preset chooses among when the training data holds labelled anomalies: each is the preset's
# config with these changes, and the one that ranks the held-out anomalies best is trained. The first is
# the preset itself, which is what training without labelled anomalies uses.
RECIPE_CANDIDATES: dict[str, dict[str, dict[str, object]]] = {
    "default": {
        "default": {},
        # Partly decorrelated inputs: directions many features share are shrunk, none is amplified.
        "decorrelated": {"decorrelate_inputs": True, "whitening_floor": 1.0},
        # Fully whitened inputs: where many features are combinations of a few, as in sensor banks.
        "whitened": {"decorrelate_inputs": True, "whitening_floor": 0.1},
    },
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
