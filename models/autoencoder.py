"""The Keras autoencoder: build it from a config, train it on normal rows, compute reconstruction errors."""

from __future__ import annotations

import random
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from models.config import AutoencoderConfig
from models.runtime import keras, tf

SCALING_LAYER = "scaling"
ENCODING_LAYER = "categories"
MISSING_LAYER = "missing_indicator"
OUTPUT_LAYER = "reconstruction"
DEFAULT_INFERENCE_ROWS = 65_536
STEPS_PER_EXECUTION = 16
# A Keras epoch of fewer rows than this costs more in Keras' own per-epoch work than in training steps.
MIN_EPOCH_ROWS = 4096
# Standardised values are clipped to this many standard deviations: far beyond anything a normal row
# shows, so every ranking is kept, while a value such as 1e30 cannot overflow the error to infinity,
# nor one absurd training row outweigh the rest in the loss.
STANDARD_LIMIT = 1000.0


@keras.saving.register_keras_serializable(package="anomaly")
class Standardize(keras.layers.Layer):
    """Fixed preprocessing learnt from training rows: fill, standardise each feature, clip, optionally whiten (ZCA).

    A missing value (NaN) is filled with the feature's training mean, so it standardises to 0. The
    statistics are weights saved in the model, so scoring reads the raw columns.
    """

    def __init__(self, features: int, limit: float = STANDARD_LIMIT, whiten: bool = False, **kwargs: object):
        kwargs["trainable"] = False
        super().__init__(**kwargs)
        self.features, self.limit, self.whiten = int(features), float(limit), bool(whiten)

    def build(self, input_shape: object) -> None:
        self.mean = self.add_weight(shape=(self.features,), initializer="zeros", trainable=False, name="mean")
        self.scale = self.add_weight(shape=(self.features,), initializer="ones", trainable=False, name="scale")
        self.whitening = (
            self.add_weight(
                shape=(self.features, self.features), initializer="identity", trainable=False, name="whitening"
            )
            if self.whiten
            else None
        )

    def call(self, inputs: object) -> object:
        filled = keras.ops.where(keras.ops.isnan(inputs), self.mean, inputs)
        standard = keras.ops.clip((filled - self.mean) / self.scale, -self.limit, self.limit)
        return keras.ops.matmul(standard, self.whitening) if self.whiten else standard

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "features": self.features, "limit": self.limit, "whiten": self.whiten}


@keras.saving.register_keras_serializable(package="anomaly")
class MissingIndicator(keras.layers.Layer):
    """1 where a feature of ``columns`` is missing (NaN), else 0: what the network sees beside the filled values.

    Only features missing in some training rows get one: an indicator never set in training would feed the
    network weights that never learnt anything.
    """

    def __init__(self, columns: list[int], **kwargs: object):
        kwargs["trainable"] = False
        super().__init__(**kwargs)
        self.columns = [int(c) for c in columns]

    def call(self, inputs: object) -> object:
        return keras.ops.cast(keras.ops.isnan(select_columns(inputs, self.columns)), "float32")

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "columns": self.columns}


@keras.saving.register_keras_serializable(package="anomaly")
class OneHotCategories(keras.layers.Layer):
    """The numeric features as they are, then each categorical feature's code one-hot encoded into its slots.

    A code is a position in the feature's training vocabulary (kept in bundle.json); unseen values have
    the last slot, and a missing value (NaN) sets none, which the missing indicator tells the network.
    The order of the values is ``encoded_features``'.
    """

    def __init__(self, features: int, columns: list[list[int]], **kwargs: object):
        kwargs["trainable"] = False
        super().__init__(**kwargs)
        self.features = int(features)
        self.columns = [[int(j), int(slots)] for j, slots in columns]
        categorical = {j for j, _ in self.columns}
        self._numeric = [j for j in range(self.features) if j not in categorical]

    def call(self, inputs: object) -> object:
        # A slot is 1 where its feature's code is the slot's own: a missing code (NaN) equals none.
        slots = [
            keras.ops.cast(keras.ops.equal(inputs[:, j : j + 1], np.arange(k, dtype=np.float32)), inputs.dtype)
            for j, k in self.columns
        ]
        return keras.ops.concatenate([select_columns(inputs, self._numeric), *slots], axis=1)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (input_shape[0], encoded_width(self.features, self.columns))

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "features": self.features, "columns": self.columns}


def select_columns(inputs: object, columns: Sequence[int]) -> object:
    """Return the ``columns`` of ``inputs``, in order, as slices of runs of adjacent columns.

    Slices cost a fraction of a gather across columns, which TensorFlow does element by element.
    """
    runs: list[list[int]] = []
    for j in columns:
        if runs and j == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([j, j + 1])
    parts = [inputs[:, start:stop] for start, stop in runs]
    return parts[0] if len(parts) == 1 else keras.ops.concatenate(parts, axis=1)


def encoded_features(features: int, columns: Sequence[Sequence[int]]) -> np.ndarray:
    """Return, for each value the model reproduces, the feature it belongs to.

    The numeric features come first, in order, then each categorical feature's slots.
    """
    slots = {int(j): int(k) for j, k in columns}
    numeric = [j for j in range(features) if j not in slots]
    return np.array(numeric + [j for j, k in slots.items() for _ in range(k)], dtype=np.int64)


def encoded_width(features: int, columns: Sequence[Sequence[int]]) -> int:
    """Return how many values a row has once each categorical feature is one-hot encoded."""
    return features + sum(int(slots) - 1 for _, slots in columns)


def sizing_width(features: int, columns: Sequence[Sequence[int]]) -> int:
    """Return the feature count the widths are sized for: a categorical feature counts as the bits its slots need.

    Naming one of k slots takes log2(k) numbers, not k: sized by its slots, a feature of 8 values would
    widen every layer by 8 where 3 carry it.
    """
    return features - len(columns) + sum(max(1, int(np.ceil(np.log2(int(slots))))) for _, slots in columns)


def one_hot_codes(features: np.ndarray, columns: Sequence[Sequence[int]]) -> np.ndarray:
    """Return ``features`` encoded as ``OneHotCategories`` encodes them (float64)."""
    features = np.asarray(features, dtype=np.float64)
    if not columns:
        return features
    slots = {int(j): int(k) for j, k in columns}
    parts = [features[:, [j for j in range(features.shape[1]) if j not in slots]]]
    for j, k in slots.items():
        codes = features[:, j]
        encoded = np.zeros((len(features), k))
        present = ~np.isnan(codes)
        encoded[np.flatnonzero(present), codes[present].astype(np.int64)] = 1.0
        parts.append(encoded)
    return np.concatenate(parts, axis=1)


def missing_columns(training_features: np.ndarray) -> list[int]:
    """Return the features that are missing (NaN) in at least one training row."""
    return np.flatnonzero(np.isnan(np.asarray(training_features, dtype=np.float64)).any(axis=0)).tolist()


def build_autoencoder(config: AutoencoderConfig, training_features: np.ndarray) -> keras.Model:
    """Build an uncompiled autoencoder whose first layer standardises with statistics of ``training_features``.

    Features missing (NaN) in some training rows are filled with their mean, and the network also sees
    which of them are missing.
    """
    unsized = [name for name, value in config.model_dump().items() if value == "auto"]
    if unsized:
        raise ValueError(
            f"size the config for its data first (AutoencoderConfig.sized_for): {', '.join(unsized)} still 'auto'"
        )
    keras.utils.set_random_seed(config.seed)
    n_features = training_features.shape[1]
    categorical = [list(c) for c in config.categorical_columns]
    inputs = keras.Input(shape=(n_features,), name="features")
    hidden = inputs
    # What the network reproduces: the features, with categorical codes one-hot encoded.
    encoded = one_hot_codes(training_features, categorical)
    width = encoded.shape[1]
    if categorical:
        hidden = OneHotCategories(n_features, categorical, name=ENCODING_LAYER)(hidden)
    if config.scale_inputs:
        # The model reproduces, and the error is measured on, standardised (and maybe decorrelated) features.
        mean, std = standardisation(encoded)
        scaling = Standardize(width, whiten=config.decorrelate_inputs, name=SCALING_LAYER)
        hidden = scaling(hidden)
        weights = [mean.astype(np.float32), std.astype(np.float32)]
        if config.decorrelate_inputs:
            weights.append(whitening_matrix(encoded, config.whitening_floor).astype(np.float32))
        scaling.set_weights(weights)
    missing = missing_columns(training_features)
    if missing:
        if not config.scale_inputs:
            raise ValueError("features with missing values need scale_inputs, which fills them in")
        # The network reconstructs the filled values; told which are filled, it learns to leave them unexplained.
        indicator = MissingIndicator(missing, name=MISSING_LAYER)(inputs)
        hidden = keras.layers.Concatenate(name="features_and_missing")([hidden, indicator])
    members = int(config.ensemble_size)
    # Each layer's initial weights get their seed from a generator of this config's own, drawn in the order Keras
    # draws its defaults from Python's global one: other threads (Prefect's) may draw from that one between
    # seeding and building, and the same seed must give the same weights.
    seeds = random.Random(config.seed)
    reconstructions = [_member(hidden, config, width, k, members, seeds) for k in range(members)]
    outputs = reconstructions[0] if members == 1 else keras.layers.Concatenate(name=OUTPUT_LAYER)(reconstructions)
    return keras.Model(inputs, outputs, name="autoencoder")


def _member(
    scaled: object, config: AutoencoderConfig, n_features: int, k: int, members: int, seeds: random.Random
) -> object:
    # Members differ by their initial weights and their dropout masks; they train side by side,
    # each on its own loss term.
    suffix = f"_{k}" if members > 1 else ""

    def dense(units: int, activation: str, name: str) -> keras.layers.Dense:
        initializer = keras.initializers.GlorotUniform(seed=seeds.randint(1, int(1e9)))
        return keras.layers.Dense(units, activation=activation, kernel_initializer=initializer, name=name)

    hidden = scaled
    if config.input_dropout:
        hidden = keras.layers.Dropout(config.input_dropout, seed=config.seed + k, name=f"input_dropout{suffix}")(hidden)
    for i, units in enumerate(config.encoder_units):
        hidden = dense(units, config.activation, f"encoder{suffix}_{i}" if suffix else f"encoder_{i}")(hidden)
    for i, units in enumerate(config.decoder_units):
        hidden = dense(units, config.activation, f"decoder{suffix}_{i}" if suffix else f"decoder_{i}")(hidden)
    return dense(n_features, config.output_activation, f"{OUTPUT_LAYER}{suffix}")(hidden)


def ensemble_members(model: keras.Model) -> int:
    """Return how many autoencoders the model holds: its output is their reconstructions side by side."""
    return int(model.outputs[0].shape[-1]) // target_width(model)


def _layer(model: keras.Model, name: str) -> keras.layers.Layer | None:
    return model.get_layer(name) if name in {layer.name for layer in model.layers} else None


def categorical_columns(model: keras.Model) -> list[list[int]]:
    """Return the (column, slots) of each categorical feature the model one-hot encodes."""
    encoding = _layer(model, ENCODING_LAYER)
    return encoding.columns if encoding is not None else []


def target_width(model: keras.Model) -> int:
    """Return how many values of each row the model reproduces (a categorical feature's slots each count)."""
    return encoded_width(int(model.inputs[0].shape[-1]), categorical_columns(model))


def target_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Return the layers that turn the raw features into what the model reproduces, in order."""
    return [layer for layer in (_layer(model, ENCODING_LAYER), _layer(model, SCALING_LAYER)) if layer is not None]


def standardisation(training_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return each feature's mean and standard deviation.

    A constant feature gets 1, so it is centred instead of divided by zero.
    """
    features = np.asarray(training_features, dtype=np.float64)
    present = ~np.isnan(features)
    rows = np.maximum(present.sum(axis=0), 1)
    # Missing values (NaN) are left out; a feature missing throughout is centred on 0.
    mean = np.where(present, features, 0.0).sum(axis=0) / rows
    std = np.sqrt(np.where(present, (features - mean) ** 2, 0.0).sum(axis=0) / rows)
    return mean, np.where(std > 0, std, 1.0)


def complete_rows(training_features: np.ndarray) -> np.ndarray:
    """Return the rows without a missing value (NaN); where too few are, every row with its gaps mean-filled.

    The statistics that decide the recipe (dependencies, moments, whitening) are those of observed values.
    """
    features = np.asarray(training_features, dtype=np.float64)
    missing = np.isnan(features)
    if not missing.any():
        return features
    complete = features[~missing.any(axis=1)]
    if len(complete) >= max(3, 2 * features.shape[1]):
        return complete
    return np.where(missing, standardisation(features)[0], features)


# An eigenvalue of the correlation matrix (their mean is 1) this small is an exact linear dependency, not noise.
DEPENDENCY_EIGENVALUE = 1e-6
DEPENDENCY_SAMPLE_ROWS = 100_000


def _varying_sample(training_features: np.ndarray) -> np.ndarray:
    # An evenly spaced sample of rows keeps an exact dependency and the moments' values, and bounds the cost on
    # large sets; constant features carry neither.
    features = complete_rows(training_features)
    features = features[:: max(1, len(features) // DEPENDENCY_SAMPLE_ROWS)]
    return features[:, features.std(axis=0) > 0]


def linear_dependencies(training_features: np.ndarray) -> int:
    """Return how many of the (non-constant) features are exact linear combinations of the others.

    That is the correlation matrix's rank deficit.
    """
    varying = _varying_sample(training_features)
    if varying.shape[1] < 2 or len(varying) < 3:
        return 0
    eigenvalues = np.linalg.eigvalsh(np.atleast_2d(np.corrcoef(varying, rowvar=False)))
    return int(np.sum(eigenvalues < DEPENDENCY_EIGENVALUE))


# Every feature of a Gaussian sample keeps its skewness and excess kurtosis (both 0 in theory) this close to 0:
# their sampling errors are about sqrt(6/n) and sqrt(24/n), 0.08 and 0.15 at a thousand rows. Real tables' features
# (counts, flags, heavy tails, mixtures of clusters) sit far outside: on every ADBench development set some
# feature is past 0.3 and 0.9.
GAUSSIAN_SKEWNESS, GAUSSIAN_EXCESS_KURTOSIS = 0.25, 0.5


def gaussian_like(training_features: np.ndarray) -> bool:
    """Return whether every varying feature's skewness and excess kurtosis are close to a Gaussian's."""
    varying = _varying_sample(training_features)
    if varying.shape[1] == 0 or len(varying) < 3:
        return False
    standard = (varying - varying.mean(axis=0)) / varying.std(axis=0)
    skewness = np.mean(standard**3, axis=0)
    excess_kurtosis = np.mean(standard**4, axis=0) - 3.0
    near_symmetric = np.all(np.abs(skewness) <= GAUSSIAN_SKEWNESS)
    return bool(near_symmetric and np.all(np.abs(excess_kurtosis) <= GAUSSIAN_EXCESS_KURTOSIS))


def whitening_matrix(training_features: np.ndarray, floor: float) -> np.ndarray:
    """Return the matrix that whitens standardised features (ZCA).

    ``standardised @ matrix`` has about unit variance in every direction the rows vary in.

    ZCA, the symmetric inverse square root of the correlation matrix, keeps each output closest to its
    own input feature, so residuals still name features. Directions of (near) zero variance, such as
    exact linear combinations, are damped by ``floor``, added to every eigenvalue of the correlation
    matrix (whose mean is 1): a direction is weighted 1/sqrt(eigenvalue + floor), at most 1/sqrt(floor).
    """
    features = complete_rows(training_features)
    _, std = standardisation(features)
    correlation = np.atleast_2d(np.cov(features, rowvar=False)) / np.outer(std, std)
    eigenvalues, eigenvectors = np.linalg.eigh(correlation)
    return (eigenvectors / np.sqrt(np.clip(eigenvalues, 0.0, None) + floor)) @ eigenvectors.T


def scaled_targets(model: keras.Model, features: np.ndarray) -> np.ndarray:
    """Return what the model learns to reproduce.

    That is the features after its scaling layer (or as they are), once per member.
    """
    features = np.asarray(features, dtype=np.float32)
    for layer in target_layers(model):
        features = np.asarray(layer(features), dtype=np.float32)
    return np.tile(features, (1, ensemble_members(model)))


@dataclass
class TrainingHistory:
    """Per-epoch losses and how training ended."""

    loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    epochs_run: int = 0
    best_epoch: int = 0
    stopped_early: bool = False


EpochCallback = Callable[[int, dict[str, float]], None]


def train_autoencoder(
    model: keras.Model,
    features: np.ndarray,
    config: AutoencoderConfig,
    on_epoch_end: EpochCallback | None = None,
) -> TrainingHistory:
    """Train ``model`` to reproduce ``features`` (normal rows only); early stopping uses a seeded share of them."""
    keras.utils.set_random_seed(config.seed)
    settings: dict[str, float] = {"learning_rate": config.learning_rate}
    if config.gradient_clip_norm is not None:
        settings["clipnorm"] = config.gradient_clip_norm
    optimizer = keras.optimizers.get({"class_name": config.optimizer, "config": settings})
    # Several steps per call into TensorFlow: for a network this small, Python overhead per step dominates.
    model.compile(optimizer=optimizer, loss=config.loss, steps_per_execution=STEPS_PER_EXECUTION)
    x = np.asarray(features, dtype=np.float32)
    y = scaled_targets(model, x)
    validation = None
    if config.validation_fraction > 0 and config.early_stopping_patience:
        order = np.random.default_rng(config.seed).permutation(len(x))
        n_val = max(1, int(round(len(x) * config.validation_fraction)))
        val_idx, fit_idx = order[:n_val], order[n_val:]
        validation = (x[val_idx], y[val_idx])
        x, y = x[fit_idx], y[fit_idx]
    passes = passes_per_epoch(len(x), config.epochs) if validation is None else 1
    if passes > 1:
        x, y = np.tile(x, (passes, 1)), np.tile(y, (passes, 1))
    callbacks: list[keras.callbacks.Callback] = []
    early_stopping = None
    if config.early_stopping_patience and validation is not None:
        early_stopping = keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=config.early_stopping_patience, restore_best_weights=True
        )
        callbacks.append(early_stopping)
    if on_epoch_end is not None:
        callbacks.append(
            keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: on_epoch_end((epoch + 1) * passes - 1, dict(logs or {}))
            )
        )
    fitted = model.fit(
        x,
        y,
        epochs=config.epochs // passes,
        batch_size=config.batch_size,
        validation_data=validation,
        shuffle=True,
        callbacks=callbacks,
        verbose=0,
    )
    loss = [float(v) for v in fitted.history.get("loss", [])]
    val_loss = [float(v) for v in fitted.history.get("val_loss", [])]
    best = int(np.argmin(val_loss)) + 1 if val_loss else len(loss)
    return TrainingHistory(
        loss=loss,
        val_loss=val_loss,
        epochs_run=len(loss) * passes,
        best_epoch=best * passes,
        stopped_early=bool(early_stopping is not None and early_stopping.stopped_epoch > 0),
    )


def passes_per_epoch(rows: int, epochs: int) -> int:
    """Return how many passes over ``rows`` rows one Keras epoch makes: enough to fill MIN_EPOCH_ROWS.

    A divisor of ``epochs``, so the fit makes exactly ``epochs`` passes over the rows.
    """
    wanted = max(1, -(-MIN_EPOCH_ROWS // max(rows, 1)))
    return max(k for k in range(1, min(wanted, epochs) + 1) if epochs % k == 0)


# A fit whose loss ends this many times above the best it reached has blown up, even if it stayed finite.
EXPLODED_LOSS_RATIO = 100.0


def divergence(history: TrainingHistory) -> str | None:
    """Return why a fit diverged (a non-finite or exploding loss), or None when it converged."""
    for name, values in (("loss", history.loss), ("validation loss", history.val_loss)):
        if not values:
            continue
        bad = [i for i, v in enumerate(values) if not np.isfinite(v)]
        if bad:
            return f"{name} became {values[bad[0]]} at epoch {bad[0] + 1}"
        best = min(values)
        if values[-1] > EXPLODED_LOSS_RATIO * max(best, 1e-12) and values[-1] > values[0]:
            return f"{name} rose to {values[-1]:.4g}, {values[-1] / best:.0f} times its best ({best:.4g})"
    return None


class ErrorScorer:
    """Per-row reconstruction error of a model, as one compiled forward pass over large chunks.

    The error is the mean, over features and the ensemble's members, of each residual's square (MSE)
    or absolute value (MAE). Residuals are reported per feature with the members folded in: a signed
    value whose square (or absolute value) is the feature's mean term over members, so that the
    features' terms still add up to the row's error exactly.
    """

    def __init__(self, model: keras.Model, loss: str, chunk_rows: int = DEFAULT_INFERENCE_ROWS, compiled: bool = True):
        self.chunk_rows = chunk_rows
        n_features = int(model.inputs[0].shape[-1])
        width = target_width(model)
        members = ensemble_members(model)
        categorical = categorical_columns(model)
        # A categorical feature's terms are the sum of its slots' terms, so that reasons name the user's column.
        groups = None
        if categorical:
            groups = tf.constant(
                np.eye(n_features, dtype=np.float32)[encoded_features(n_features, categorical)], dtype=tf.float32
            )
            is_categorical = tf.constant(np.isin(np.arange(n_features), [j for j, _ in categorical]), dtype=tf.bool)

        def function(input_signature: list[tf.TensorSpec]) -> Callable[[Callable[..., object]], Callable[..., object]]:
            # A model scored once (a fold's, a candidate's) is not worth tracing: TensorFlow warns when many are.
            return tf.function(input_signature=input_signature, reduce_retracing=True) if compiled else (lambda fn: fn)

        to_target = target_layers(model)
        reduce = tf.square if loss == "mse" else tf.abs
        # One pass gives the reconstruction and, from inside the same graph, the target: the encoding and
        # scaling of the inputs are computed once, not again beside the model.
        with_target = keras.Model(model.inputs[0], [model.outputs[0], to_target[-1].output]) if to_target else None

        # Members side by side: input minus reconstruction is (rows, members, width); one member's is (rows, width).
        axes = [1] if members == 1 else [1, 2]

        def residuals_of(x: tf.Tensor) -> tf.Tensor:
            if with_target is None:
                reconstruction, target = model(x, training=False), x
            else:
                reconstruction, target = with_target(x, training=False)
            if members == 1:
                return target - reconstruction
            return target[:, None, :] - tf.reshape(reconstruction, [-1, members, width])

        @function([tf.TensorSpec([None, n_features], tf.float32)])
        def errors(x: tf.Tensor) -> tf.Tensor:
            return tf.reduce_mean(reduce(residuals_of(x)), axis=axes)

        @function([tf.TensorSpec([None, n_features], tf.float32), tf.TensorSpec([], tf.float64)])
        def errors_and_flagged_residuals(x: tf.Tensor, threshold: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            # Input minus reconstruction, each member's, on the error's scale.
            residuals = residuals_of(x)
            row_errors = tf.reduce_mean(reduce(residuals), axis=axes)
            # Compared in float64, as the caller compares the returned errors, so both pick the same rows; only
            # those (a few in a hundred) are folded into per-feature residuals.
            residuals = tf.boolean_mask(residuals, tf.cast(row_errors, tf.float64) > threshold)
            if members == 1:
                terms, direction = reduce(residuals), residuals > 0
            else:
                terms, direction = tf.reduce_mean(reduce(residuals), axis=1), tf.reduce_sum(residuals, axis=1) > 0
            if groups is not None:
                terms = tf.matmul(terms, groups)
                # A category is unusual, neither high nor low: its share is reported as positive.
                direction = tf.logical_or(tf.matmul(tf.cast(direction, tf.float32), groups) > 0, is_categorical)
            magnitude = tf.sqrt(terms) if loss == "mse" else terms
            return row_errors, tf.where(direction, magnitude, -magnitude)

        self._errors = errors
        self._errors_and_flagged_residuals = errors_and_flagged_residuals

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """Return the reconstruction error of each row of ``features`` as float64."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        out = np.empty(len(features), dtype=np.float64)
        for start in range(0, len(features), self.chunk_rows):
            stop = min(start + self.chunk_rows, len(features))
            out[start:stop] = self._errors(features[start:stop]).numpy()
        return out

    def with_flagged_residuals(self, features: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Return each row's error (float64) and the residuals of the rows above ``threshold``.

        The residuals are, for the rows above ``threshold`` in order, input minus reconstruction on the
        error's scale (members folded in).

        The residuals come from the same forward pass as the errors: explaining flagged rows costs no second pass.
        """
        features = np.ascontiguousarray(features, dtype=np.float32)
        out = np.empty(len(features), dtype=np.float64)
        flagged = []
        limit = tf.constant(threshold, dtype=tf.float64)
        for start in range(0, len(features), self.chunk_rows):
            stop = min(start + self.chunk_rows, len(features))
            chunk_errors, chunk_residuals = self._errors_and_flagged_residuals(features[start:stop], limit)
            out[start:stop] = chunk_errors.numpy()
            flagged.append(chunk_residuals.numpy())
        residuals = np.concatenate(flagged) if len(flagged) != 1 else flagged[0]
        return out, residuals.reshape(-1, features.shape[1])


_SCORERS: weakref.WeakKeyDictionary[keras.Model, dict[str, ErrorScorer]] = weakref.WeakKeyDictionary()


def reconstruction_errors(model: keras.Model, features: np.ndarray, loss: str, compiled: bool = True) -> np.ndarray:
    """Return the per-row reconstruction error of ``features`` (mean squared or absolute, as ``loss``).

    Use ``compiled=False`` for a model scored once.
    """
    if not compiled:
        return ErrorScorer(model, loss, compiled=False)(features)
    # One compiled function per model: tracing again on every call would cost more than small inputs do.
    scorers = _SCORERS.setdefault(model, {})
    if loss not in scorers:
        scorers[loss] = ErrorScorer(model, loss)
    return scorers[loss](features)
