"""A component's config taken from the settings it is started with, field by field."""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Config = TypeVar("Config", bound="DataclassInstance")


def same_named(config: type[Config], settings: object, **given: Any) -> Config:
    """A `config` whose fields hold the settings of the same name.

    Components name a field as the setting it comes from, so a setting greps to where it
    is used; `given` supplies the fields named otherwise, and a field the settings do not
    have keeps its default.
    """
    values = {
        f.name: getattr(settings, f.name)
        for f in fields(config)
        if f.init and f.name not in given and hasattr(settings, f.name)
    }
    return config(**values, **given)
