"""Parameter types and defaults the flows share, kept free of heavy imports so that any flow can use them."""

from __future__ import annotations

import os
from typing import Any

from pydantic import WithJsonSchema

DEFAULT_TIMEZONE = os.environ.get("ANOMALY_TIMEZONE", "UTC")

# A date is a plain date field in the UI's Custom run form: the schema of `date | None` would add a
# type toggle ("Property is type None"), and a null default would fail the form's own check of a
# string field. So the form's default is "", which an empty field sends and which means today.
RUN_DATE_SCHEMA = WithJsonSchema({"type": "string", "format": "date"})


def empty_means_today(value: Any) -> Any:
    """Read an empty date field of the run form as no date."""
    return None if value == "" else value
