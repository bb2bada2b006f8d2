"""Import TensorFlow and Keras once, quietly, with threads matched to the cores this process may use."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

__all__ = ["keras", "tf", "limit_threads", "cpu_threads"]


def cpu_threads() -> int:
    """Return how many CPU cores this process may use (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def limit_threads(threads: int) -> None:
    """Cap TensorFlow's intra-op threads (call before the first op runs; later calls are ignored)."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError:
        # TensorFlow fixes its thread pools at the first op; a later call cannot change them.
        pass


# Containers and Dask workers often see every core of the host but may use fewer.
limit_threads(int(os.environ.get("ANOMALY_TF_THREADS", "0")) or cpu_threads())
