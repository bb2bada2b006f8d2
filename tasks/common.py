"""What several tasks share: the retry rule for transient file-system errors."""

from __future__ import annotations

from typing import Any


def retry_on_os_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only transient file-system trouble (OSError); bad input fails at once."""
    try:
        state.result()
    except OSError:
        return True
    except Exception:
        return False
    return False
