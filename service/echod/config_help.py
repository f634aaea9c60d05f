"""The `--help` text of every setting, built from the model's descriptions (config.py): one source for
`echod run --help` and config/echod.toml's comments (tests/test_config.py holds them to it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .config import Metavar, Settings


def setting_fields() -> Iterator[tuple[str, FieldInfo]]:
    """Every setting as (dotted key, field), the sections' keys flattened: `metrics.listen`."""
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for sub, subfield in annotation.model_fields.items():
                yield f"{name}.{sub}", subfield
        else:
            yield name, field


def setting_metavar(field: FieldInfo) -> str:
    """The name `--help` gives a setting's value: its Metavar, else its Literal choices (`text|json`)."""
    for item in field.metadata:
        if isinstance(item, Metavar):
            return item.name
    if get_origin(field.annotation) is Literal:
        return "|".join(str(choice) for choice in get_args(field.annotation))
    raise TypeError(f"setting of type {field.annotation} without a Metavar")


def setting_default(field: FieldInfo) -> str:
    """A setting's default as a flag would take it: `300`, `127.0.0.1:7007`, `""`, `none` (an empty list)."""
    value = field.get_default(call_default_factory=True)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | dict):
        if not value:
            return "none"
        return ", ".join(map(str, value)) if isinstance(value, list) else json.dumps(value)
    if value == "":
        return '""'
    return str(value)


def setting_help(field: FieldInfo) -> str:
    """A setting's description and default, as `echod run --help` shows them."""
    return f"{field.description} (default {setting_default(field)})"
