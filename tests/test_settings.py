"""Each global setting, and each log level, is declared once in clipal.config.

What the rest of clipal knows about them (the Settings fields, the keys config.yaml
accepts, what a reload applies and what needs a restart, the command-line flags, the
levels logging uses) must come from that one declaration, so adding or changing one
is one edit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from types import MappingProxyType
from typing import Mapping, get_type_hints

import pytest

from clipal import logs, reload
from clipal import runtime as runtime_module
from clipal.config import (
    LOG_LEVEL_NAMES,
    LOG_LEVELS,
    SETTINGS,
    ConfigError,
    Setting,
    Settings,
    check_settings,
    load_config,
    parse_settings,
    settings_class,
)
from conftest import write_yaml

NAMES = [setting.name for setting in SETTINGS]
DECLARED = {setting.name: setting for setting in SETTINGS}


# --- one declaration per setting --------------------------------------------------------


def test_setting_names_are_unique_and_are_the_dataclass_fields_in_order():
    assert len(set(NAMES)) == len(NAMES)
    assert [f.name for f in dataclasses.fields(Settings)] == NAMES


@pytest.mark.parametrize("setting", SETTINGS, ids=NAMES)
def test_each_field_takes_its_type_and_default_from_the_declaration(setting):
    (f,) = [f for f in dataclasses.fields(Settings) if f.name == setting.name]
    assert f.type == get_type_hints(setting.check)["return"]
    assert getattr(Settings(), setting.name) == setting.default


@pytest.mark.parametrize("setting", SETTINGS, ids=NAMES)
def test_each_default_passes_its_own_check_unchanged(setting):
    assert setting.check(setting.default) == setting.default
    assert parse_settings({setting.name: setting.default}) == Settings()


def test_config_yaml_accepts_exactly_the_declared_keys():
    candidates = NAMES + ["colour", "Port", "log-level", "settings"]
    accepted = []
    for key in candidates:
        try:
            parse_settings({key: DECLARED[key].default if key in DECLARED else "x"})
        except ConfigError as error:
            assert f"unknown key {key!r}" in str(error)
        else:
            accepted.append(key)
    assert accepted == NAMES


def test_settings_stay_a_frozen_dataclass():
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]
    changed = dataclasses.replace(settings, port=4444)
    assert (changed.port, settings.port) == (4444, 3333)
    assert changed != settings and type(changed) is Settings
    assert "port (int, default 3333, needs a restart): port to listen on" in (Settings.__doc__ or "")


#: A valid value other than the default for every setting, as config.yaml would hold it.
OTHER_VALUES = {
    "listen_addr": "127.0.0.2", "port": 4444, "log_level": "debug", "reactivate_after": "30m",
    "circuit_breaker": {"failure_threshold": 0, "success_threshold": 5, "open_timeout": "2m"},
    "upstream_idle_timeout": "45s", "max_request_body_bytes": 1000, "log_dir": "/tmp/clipal-elsewhere",
    "log_retention_days": 30, "log_stdout": False, "ignore_count_tokens_failover": True,
    "access_tokens": ["a-reloaded-token-0123456789"], "allowed_origins": ["https://app.example"],
    "allowed_hosts": ["clipal.lan"], "metrics": False, "state_url": "redis://127.0.0.1:6390/1",
    "state_prefix": "team-a",
}


class _Recorder:
    """Stands in for the clipal logger: keeps (level, line) pairs."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def _record(self, level: str, message: str, *args: object, **_: object) -> None:
        self.lines.append((level, message % args))

    def warning(self, message: str, *args: object, **kwargs: object) -> None:
        self._record("warning", message, *args, **kwargs)

    def info(self, message: str, *args: object, **kwargs: object) -> None:
        self._record("info", message, *args, **kwargs)


def test_a_reload_applies_every_setting_or_says_it_needs_a_restart(tmp_path, monkeypatch):
    assert set(OTHER_VALUES) == set(NAMES), "give the new setting a value above"
    # The socket's, and the state store's (chosen once per process).
    assert [setting.name for setting in SETTINGS if setting.restart] == ["listen_addr", "port", "state_url",
                                                                         "state_prefix"]
    log = _Recorder()
    monkeypatch.setattr(reload, "get_logger", lambda: log)
    monkeypatch.setattr(runtime_module, "apply_logging", lambda config: None)  # the process's logging stays
    runtime = runtime_module.Runtime(load_config(tmp_path))
    write_yaml(tmp_path / "config.yaml", OTHER_VALUES)

    assert reload.Reloader(runtime).reload()
    warnings = [line for level, line in log.lines if level == "warning"]
    (reloaded,) = [line for level, line in log.lines if level == "info"]
    running = runtime.snapshot.config.settings
    wanted = parse_settings(OTHER_VALUES)
    for setting in SETTINGS:
        if setting.restart:
            assert f"config.yaml: {setting.name} changed to {getattr(wanted, setting.name)!r}; restart clipal " \
                   "to apply it" in warnings
            assert getattr(running, setting.name) == setting.default  # still what is served
            assert f"{setting.name} =" not in reloaded
        else:
            assert f"config.yaml: {setting.name} = {getattr(wanted, setting.name)!r}" in reloaded
            assert getattr(running, setting.name) == getattr(wanted, setting.name)
    assert len(warnings) == sum(setting.restart for setting in SETTINGS)


# clipal.cli patches the process with gevent when imported, so it is asked in a child process.
_CLI_PROBE = """
import json, sys
from clipal import cli
parser = cli._parser()
options = {action.option_strings[-1]: action.dest for action in parser._actions if action.option_strings}
print(json.dumps({"options": options, "overrides": cli.flag_overrides(parser.parse_args(sys.argv[1:]))}))
"""


def test_every_command_line_flag_sets_a_declared_setting():
    flagged = {setting.flag.option: setting.name for setting in SETTINGS if setting.flag is not None}
    argv = [word for option, name in flagged.items() for word in (option, str(OTHER_VALUES[name]))]
    result = subprocess.run([sys.executable, "-c", _CLI_PROBE, *argv], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout)
    others = {"--help": "help", "--config-dir": "config_dir", "--version": "version"}
    assert probe["options"] == {**others, **flagged}
    wanted = parse_settings(OTHER_VALUES)
    assert probe["overrides"] == {name: getattr(wanted, name) for name in flagged.values()}


# --- list- and mapping-valued settings (as later ones will be) -----------------------------


def _tokens(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ValueError("must be a list of non-empty strings")
    return tuple(value)


def _breaker(value: object) -> Mapping[str, int]:
    if not isinstance(value, dict) or set(value) - {"failures", "window"}:
        raise ValueError("must be a mapping with failures and window")
    return MappingProxyType({"failures": 5, "window": 60, **value})


TRIAL = (
    DECLARED["port"],
    Setting("access_tokens", _tokens, default=(), help="tokens clients must present"),
    Setting("allowed_hosts", _tokens, default=["localhost"], help="a mutable default"),
    Setting("circuit_breaker", _breaker, default=MappingProxyType({"failures": 5, "window": 60}),
            help="when a provider is opened"),
)


def test_a_table_can_declare_list_and_mapping_settings_with_their_own_checkers():
    trial = settings_class(TRIAL)
    assert [f.name for f in dataclasses.fields(trial)] == ["port", "access_tokens", "allowed_hosts",
                                                           "circuit_breaker"]
    assert get_type_hints(trial)["access_tokens"] == tuple[str, ...]
    default = trial()
    assert (default.access_tokens, default.allowed_hosts, dict(default.circuit_breaker)) == (
        (), ["localhost"], {"failures": 5, "window": 60})
    assert trial().allowed_hosts is not default.allowed_hosts  # a mutable default is not shared

    values = check_settings(TRIAL, {"access_tokens": ["a", "b"], "circuit_breaker": {"failures": 2}}, "t.yaml")
    loaded = trial(**values)
    assert loaded.access_tokens == ("a", "b") and dict(loaded.circuit_breaker) == {"failures": 2, "window": 60}
    assert dataclasses.replace(loaded, port=4444).access_tokens == ("a", "b")
    with pytest.raises(ConfigError, match=r"^t\.yaml: access_tokens must be a list of non-empty strings$"):
        check_settings(TRIAL, {"access_tokens": "abc"}, "t.yaml")
    with pytest.raises(ConfigError, match=r"^t\.yaml: circuit_breaker must be a mapping"):
        check_settings(TRIAL, {"circuit_breaker": {"colour": 1}}, "t.yaml")


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
