"""Prefect flows: retraining, nightly scoring and the demo, plus the ``anomaly`` command line."""
