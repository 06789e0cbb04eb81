"""A component's config taken from the settings it is started with, field by field."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Config = TypeVar("Config", bound="DataclassInstance")


def same_named(
    config: type[Config], settings: object, *, defaults: Collection[str] = (), **given: Any
) -> Config:
    """A `config` whose fields hold the settings of the same name.

    Components name a field as the setting it comes from, so a setting greps to where it
    is used; `given` supplies the fields named otherwise. A field the settings lack must
    be named in `defaults` to keep its default: a renamed setting then fails at start-up
    instead of silently leaving a safety limit at its default.
    """
    values: dict[str, Any] = {}
    missing: list[str] = []
    for f in fields(config):
        if not f.init or f.name in given:
            continue
        if hasattr(settings, f.name):
            values[f.name] = getattr(settings, f.name)
        elif f.name not in defaults:
            missing.append(f.name)
    if missing:
        raise TypeError(
            f"{config.__name__} fields {missing} have no setting of that name in "
            f"{type(settings).__name__}: pass them, or name them in `defaults`"
        )
    return config(**values, **given)
