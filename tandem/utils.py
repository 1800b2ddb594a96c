"""Small helpers shared across the code base: block arithmetic, JSON-valued flags."""

import json
from dataclasses import fields


def cdiv(a: int, b: int) -> int:
    """a / b rounded up: how many blocks of b hold a tokens."""
    return -(a // -b)


def json_flag_fields(text: str, config_cls: type, flag: str) -> dict:
    """A flag's JSON object, checked against the fields of the dataclass it configures
    (vLLM's JSON-valued flags); ValueError naming the flag otherwise."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} must be JSON: {e}") from None
    known = {f.name for f in fields(config_cls)}
    if not isinstance(values, dict) or set(values) - known:
        raise ValueError(f"{flag} takes an object with keys {', '.join(sorted(known))}")
    return values
