"""Checks on what the registry is asked to store.

These checks are what keeps adapter matrices, tensors and user text out of the
registry: metrics must be flat dicts of short JSON scalars, hyperparameters may add
only short lists of scalars, and identifiers must have their expected shapes. A tensor,
a nested list of numbers or a paragraph of text fails them with a RegistryError.
"""

from __future__ import annotations

import enum
import json
import math
import re
from datetime import datetime
from typing import Any

from plora.storage.errors import RegistryError, quoted

MAX_KEYS = 64
MAX_KEY_CHARS = 64
# Long enough for a label such as a dataset or metric name, too short for user text.
MAX_STR_CHARS = 128
MAX_LIST_ITEMS = 32
MAX_REASON_CHARS = 2000

_SHA256 = re.compile(r"[0-9a-f]{64}")
_DEVICE_ID = re.compile(r"[0-9a-f]{32}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _scalar(what: str, key: str, value: Any) -> bool | int | float | str:
    # bool first: it is a subclass of int. The casts turn numpy-style subclasses into
    # plain Python values that every JSON backend accepts.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RegistryError(f"{what}[{key!r}] = {value!r}: only finite numbers can be stored")
        return float(value)
    if isinstance(value, str):
        if len(value) > MAX_STR_CHARS:
            raise RegistryError(
                f"{what}[{key!r}] is a string of {len(value)} characters; at most {MAX_STR_CHARS} "
                "are stored, so that no user text reaches the registry"
            )
        return str(value)
    raise RegistryError(
        f"{what}[{key!r}] is a {type(value).__name__}; only numbers, strings and bools can be "
        "stored (convert tensors with .item(), and keep tensors and user data out of the registry)"
    )


def _flat_dict(what: str, values: Any, allow_lists: bool) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise RegistryError(f"{what} must be a dict, got {type(values).__name__}")
    if len(values) > MAX_KEYS:
        raise RegistryError(f"{what} has {len(values)} entries; at most {MAX_KEYS} are stored")
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS:
            raise RegistryError(f"{what} key {key!r} must be a string of 1 to {MAX_KEY_CHARS} characters")
        if allow_lists and isinstance(value, (list, tuple)):
            if len(value) > MAX_LIST_ITEMS:
                raise RegistryError(f"{what}[{key!r}] has {len(value)} items; at most {MAX_LIST_ITEMS} are stored")
            clean[key] = [_scalar(what, key, item) for item in value]
        else:
            clean[key] = _scalar(what, key, value)
    return clean


def metrics(what: str, values: dict[str, Any] | None) -> dict[str, Any] | None:
    """A flat dict of JSON scalars (numbers, strings up to 128 characters, bools), or None."""
    return None if values is None else _flat_dict(what, values, allow_lists=False)


def params(values: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters: like metrics, plus short lists of scalars (e.g. target modules)."""
    return _flat_dict("params", values, allow_lists=True)


def config(what: str, values: Any) -> dict[str, Any]:
    """A JSON-serializable dict (architecture, adapter configuration), normalized via JSON."""
    if not isinstance(values, dict):
        raise RegistryError(f"{what} must be a dict, got {type(values).__name__}")
    try:
        return json.loads(json.dumps(values, allow_nan=False, sort_keys=True))
    except (TypeError, ValueError) as err:
        raise RegistryError(f"{what} is not plain JSON: {err}") from err


def content_hash(value: Any) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise RegistryError(f"content_hash {value!r} is not a lowercase sha256 hex digest (64 characters)")
    return value


def device_id(value: Any) -> str:
    if not isinstance(value, str) or not _DEVICE_ID.fullmatch(value):
        raise RegistryError(f"device id {value!r} is not a uuid4 hex string (32 lowercase hex characters)")
    return value


def job_uuid(value: Any) -> str:
    if not isinstance(value, str) or not _DEVICE_ID.fullmatch(value):  # the same shape: a uuid4 in hex
        raise RegistryError(f"a job's uuid must be 32 lowercase hex characters, got {quoted(value)}")
    return value


def moment(what: str, value: Any, optional: bool = False) -> datetime | None:
    if value is None and optional:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise RegistryError(f"{what} must be a timezone-aware datetime, got {quoted(value)}")
    return value


def count(what: str, value: Any) -> int:
    if not is_int(value) or value < 0:
        raise RegistryError(f"{what} must be a non-negative int, got {value!r}")
    return value


def reason(value: Any) -> str:
    """An error message, cut to MAX_REASON_CHARS so a message quoting input stays short."""
    if not isinstance(value, str) or not value.strip():
        raise RegistryError(f"a failure reason must be a non-empty error message, got {value!r}")
    return value if len(value) <= MAX_REASON_CHARS else value[: MAX_REASON_CHARS - 3] + "..."


def text(what: str, value: Any, limit: int = 128, optional: bool = False) -> Any:
    """A short identifier-like string (name, label, path, credential hash)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise RegistryError(f"{what} must be a string of 1 to {limit} characters, got {value!r}")
    return value


def choice(what: str, value: Any, allowed: type[enum.StrEnum]) -> str:
    try:
        return allowed(value).value
    except ValueError:
        raise RegistryError(f"{what} {value!r} is not one of {', '.join(v.value for v in allowed)}") from None
