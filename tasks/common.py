"""What several tasks share: the retry rule for transient file-system errors."""

from __future__ import annotations

from typing import Any

from data.storage import TRANSIENT_RETRIES, TRANSIENT_RETRY_DELAY_S, worth_retrying


def retry_on_transient_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only transient trouble (an I/O error of the disk or network file system); bad input fails at once."""
    try:
        state.result()
    except Exception as exc:
        return worth_retrying(exc)
    return False


# Task options of every task that touches files: two retries, two seconds apart, of transient errors only.
RETRIES: dict[str, Any] = {
    "retries": TRANSIENT_RETRIES,
    "retry_delay_seconds": TRANSIENT_RETRY_DELAY_S,
    "retry_condition_fn": retry_on_transient_error,
}
