"""The Keras autoencoder: build it from a config, train it on normal rows, compute reconstruction errors."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from models.config import AutoencoderConfig
from models.runtime import keras, tf

SCALING_LAYER = "scaling"
OUTPUT_LAYER = "reconstruction"
DEFAULT_INFERENCE_ROWS = 65_536
STEPS_PER_EXECUTION = 16
# Added to the correlation matrix's eigenvalues before whitening (their mean is 1): a direction with far
# less variance, such as an exact linear combination, is weighted at most 1/sqrt(floor) instead of inverted,
# so the noise of nearly constant directions does not swamp the error.
WHITENING_FLOOR = 0.1


def build_autoencoder(config: AutoencoderConfig, training_features: np.ndarray) -> keras.Model:
    """Build an uncompiled autoencoder whose first layer standardises with statistics of ``training_features``."""
    keras.utils.set_random_seed(config.seed)
    n_features = training_features.shape[1]
    inputs = keras.Input(shape=(n_features,), name="features")
    hidden = inputs
    if config.scale_inputs:
        mean, std = standardisation(training_features)
        if config.decorrelate_inputs:
            # One fixed affine layer standardises and whitens: the model reproduces, and the error is measured on, decorrelated features.
            kernel = whitening_matrix(training_features) / std[:, None]
            scaling = keras.layers.Dense(n_features, name=SCALING_LAYER, trainable=False)
            hidden = scaling(hidden)
            scaling.set_weights([kernel.astype(np.float32), (-(mean @ kernel)).astype(np.float32)])
        else:
            hidden = keras.layers.Normalization(mean=mean.tolist(), variance=(std**2).tolist(), name=SCALING_LAYER)(hidden)
    if config.input_dropout:
        hidden = keras.layers.Dropout(config.input_dropout, seed=config.seed, name="input_dropout")(hidden)
    for i, units in enumerate(config.encoder_units):
        hidden = keras.layers.Dense(units, activation=config.activation, name=f"encoder_{i}")(hidden)
    for i, units in enumerate(config.decoder_units):
        hidden = keras.layers.Dense(units, activation=config.activation, name=f"decoder_{i}")(hidden)
    outputs = keras.layers.Dense(n_features, activation=config.output_activation, name=OUTPUT_LAYER)(hidden)
    return keras.Model(inputs, outputs, name="autoencoder")


def standardisation(training_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return each feature's mean and standard deviation; a constant feature gets 1, so it is centred instead of divided by zero."""
    features = np.asarray(training_features, dtype=np.float64)
    std = features.std(axis=0)
    return features.mean(axis=0), np.where(std > 0, std, 1.0)


def whitening_matrix(training_features: np.ndarray) -> np.ndarray:
    """Return the matrix that whitens standardised features (ZCA): ``standardised @ matrix`` has about unit variance in every direction the rows vary in.

    ZCA, the symmetric inverse square root of the correlation matrix, keeps each output closest to its
    own input feature, so residuals still name features. Directions of (near) zero variance, such as
    exact linear combinations, are damped by a floor instead of blown up.
    """
    _, std = standardisation(training_features)
    correlation = np.atleast_2d(np.cov(training_features, rowvar=False)) / np.outer(std, std)
    eigenvalues, eigenvectors = np.linalg.eigh(correlation)
    return (eigenvectors / np.sqrt(np.clip(eigenvalues, 0.0, None) + WHITENING_FLOOR)) @ eigenvectors.T


def scaled_targets(model: keras.Model, features: np.ndarray) -> np.ndarray:
    """Return what the model learns to reproduce: the features after its scaling layer (or as they are)."""
    features = np.asarray(features, dtype=np.float32)
    if SCALING_LAYER not in {layer.name for layer in model.layers}:
        return features
    scaling = model.get_layer(SCALING_LAYER)
    return np.asarray(scaling(features), dtype=np.float32)


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
    optimizer = keras.optimizers.get({"class_name": config.optimizer, "config": {"learning_rate": config.learning_rate}})
    # Several steps per call into TensorFlow: for a network this small, Python overhead per step dominates.
    model.compile(optimizer=optimizer, loss=config.loss, steps_per_execution=STEPS_PER_EXECUTION)
    x = np.asarray(features, dtype=np.float32)
    y = scaled_targets(model, x)
    validation = None
    if config.validation_fraction > 0:
        order = np.random.default_rng(config.seed).permutation(len(x))
        n_val = max(1, int(round(len(x) * config.validation_fraction)))
        val_idx, fit_idx = order[:n_val], order[n_val:]
        validation = (x[val_idx], y[val_idx])
        x, y = x[fit_idx], y[fit_idx]
    callbacks: list[keras.callbacks.Callback] = []
    early_stopping = None
    if config.early_stopping_patience and validation is not None:
        early_stopping = keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=config.early_stopping_patience, restore_best_weights=True
        )
        callbacks.append(early_stopping)
    if on_epoch_end is not None:
        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: on_epoch_end(epoch, dict(logs or {}))))
    fitted = model.fit(
        x,
        y,
        epochs=config.epochs,
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
        epochs_run=len(loss),
        best_epoch=best,
        stopped_early=bool(early_stopping is not None and early_stopping.stopped_epoch > 0),
    )


class ErrorScorer:
    """Per-row reconstruction error of a model, as one compiled forward pass over large chunks."""

    def __init__(self, model: keras.Model, loss: str, chunk_rows: int = DEFAULT_INFERENCE_ROWS):
        self.chunk_rows = chunk_rows
        n_features = model.inputs[0].shape[-1]
        scaling = model.get_layer(SCALING_LAYER) if SCALING_LAYER in {layer.name for layer in model.layers} else None
        reduce = tf.square if loss == "mse" else tf.abs

        @tf.function(input_signature=[tf.TensorSpec([None, n_features], tf.float32)], reduce_retracing=True)
        def errors(x: tf.Tensor) -> tf.Tensor:
            target = scaling(x) if scaling is not None else x
            return tf.reduce_mean(reduce(model(x, training=False) - target), axis=1)

        @tf.function(input_signature=[tf.TensorSpec([None, n_features], tf.float32), tf.TensorSpec([], tf.float64)], reduce_retracing=True)
        def errors_and_flagged_residuals(x: tf.Tensor, threshold: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            target = scaling(x) if scaling is not None else x
            residuals = target - model(x, training=False)
            row_errors = tf.reduce_mean(reduce(residuals), axis=1)
            # Compared in float64, as the caller compares the returned errors, so both pick the same rows.
            return row_errors, tf.boolean_mask(residuals, tf.cast(row_errors, tf.float64) > threshold)

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
        """Return each row's error (float64) and, for the rows above ``threshold`` in order, input minus reconstruction on the error's scale.

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


def reconstruction_errors(model: keras.Model, features: np.ndarray, loss: str) -> np.ndarray:
    """Return the per-row reconstruction error of ``features`` (mean squared or absolute, as ``loss``)."""
    # One compiled function per model: tracing again on every call would cost more than small inputs do.
    scorers = _SCORERS.setdefault(model, {})
    if loss not in scorers:
        scorers[loss] = ErrorScorer(model, loss)
    return scorers[loss](features)
