"""Components' configs taken from the settings by field name."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from config.ledger import LedgerConfig
from config.sections import same_named
from config.settings import Settings


def test_a_config_built_from_settings_names_every_field_it_cannot_fill() -> None:
    settings = Settings(jwt_secret="x" * 32)
    ledger = settings.ledger()
    assert ledger.ack_timeout_ms == settings.ack_timeout_ms
    assert ledger.delivery_batch == LedgerConfig().delivery_batch  # named in `defaults`

    @dataclass
    class Limits:
        ack_timeout_ms: int = 0
        max_power_kw: float = 10.0  # no setting of that name

    with pytest.raises(TypeError, match=r"Limits fields \['max_power_kw'\] have no setting"):
        same_named(Limits, settings)
    assert same_named(Limits, settings, defaults=("max_power_kw",)).max_power_kw == 10.0
    assert same_named(Limits, settings, max_power_kw=5.0).ack_timeout_ms == settings.ack_timeout_ms
