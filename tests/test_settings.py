"""Each global setting, and each log level, is declared once in clipal.config.

What the rest of clipal knows about them (the Settings fields, the keys config.yaml
accepts, the levels logging uses) must come from that one declaration, so adding
or changing one is one edit.
"""

from __future__ import annotations

import logging

import pytest

from clipal import logs
from clipal.config import LOG_LEVEL_NAMES, LOG_LEVELS, parse_settings


# --- log levels ---------------------------------------------------------------------------


def test_log_levels_are_the_four_documented_ones_with_warning_as_warn():
    assert LOG_LEVEL_NAMES == ("debug", "info", "warn", "error")
    assert LOG_LEVELS["warn"] == LOG_LEVELS["warning"] == logging.WARNING
    assert set(LOG_LEVELS) == set(LOG_LEVEL_NAMES) | {"warning"}


@pytest.mark.parametrize("name", sorted(LOG_LEVELS))
def test_config_and_logging_agree_on_every_level(name):
    stored = parse_settings({"log_level": name.upper()}).log_level
    assert stored in LOG_LEVEL_NAMES
    assert LOG_LEVELS[stored] == LOG_LEVELS[name] == logs.parse_level(name) == logs.parse_level(stored)
