"""Configuration parsing and validation (SPEC §2, §1 "invalid configuration").

Unit tests over clipal.config: every key of config.yaml with its default,
explicit zeros, durations, provider defaults and ordering, and one test per
kind of mistake a user can make, each checked to produce a ConfigError that
reads as ONE line naming the file, the provider (when any) and the field.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from clipal.config import (
    ConfigError,
    Provider,
    Settings,
    active_providers,
    load_config,
    parse_duration,
)
from clipal.failover import ProviderPool


def write(config_dir: Path, name: str, text: str) -> Path:
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / name
    path.write_text(textwrap.dedent(text))
    return path


def load_error(config_dir: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(config_dir)
    return info.value


def assert_one_line(error: ConfigError, file: str, *parts: str) -> str:
    """The message is one line that starts with the file and names every part."""
    text = str(error)
    assert "\n" not in text and "\r" not in text, text
    assert text.startswith(f"{file}: "), text
    for part in parts:
        assert part in text, f"{part!r} not in {text!r}"
    return text


PROVIDER = "providers:\n  - name: p\n    base_url: https://api.example.com\n    api_key: sk-p\n"


# --- defaults ------------------------------------------------------------------


def test_every_setting_has_its_documented_default(tmp_path):
    config = load_config(tmp_path)
    s = config.settings
    assert s.listen_addr == "127.0.0.1"
    assert s.port == 3333
    assert s.log_level == "info"
    assert s.reactivate_after == 3600
    assert s.upstream_idle_timeout == 180
    assert s.max_request_body_bytes == 33554432
    assert s.log_dir == "" and config.log_dir == tmp_path / "logs"
    assert s.log_retention_days == 7
    assert s.log_stdout is True
    assert s.ignore_count_tokens_failover is False
    assert s == Settings()


def test_missing_directory_means_defaults_and_no_providers(tmp_path):
    config = load_config(tmp_path / "does-not-exist")
    assert config.settings == Settings()
    assert dict(config.providers) == {"claudecode": (), "codex": (), "gemini": ()}


def test_empty_files_mean_defaults_and_no_providers(tmp_path):
    for name in ("config.yaml", "claude-code.yaml", "codex.yaml", "gemini.yaml"):
        write(tmp_path, name, "")
    write(tmp_path, "gemini.yaml", "providers:\n")
    config = load_config(tmp_path)
    assert config.settings == Settings()
    assert all(ps == () for ps in config.providers.values())


def test_every_setting_can_be_set(tmp_path):
    write(tmp_path, "config.yaml", f"""\
        listen_addr: 0.0.0.0
        port: 4444
        log_level: debug
        reactivate_after: 30m
        upstream_idle_timeout: 45s
        max_request_body_bytes: 1000
        log_dir: {tmp_path / "elsewhere"}
        log_retention_days: 30
        log_stdout: false
        ignore_count_tokens_failover: true
        """)
    config = load_config(tmp_path)
    assert config.settings == Settings(
        listen_addr="0.0.0.0", port=4444, log_level="debug", reactivate_after=1800,
        upstream_idle_timeout=45, max_request_body_bytes=1000, log_dir=str(tmp_path / "elsewhere"),
        log_retention_days=30, log_stdout=False, ignore_count_tokens_failover=True,
    )
    assert config.log_dir == tmp_path / "elsewhere"


@pytest.mark.parametrize("level, expected", [("debug", "debug"), ("info", "info"), ("warn", "warn"),
                                             ("error", "error"), ("WARNING", "warn")])
def test_log_levels(tmp_path, level, expected):
    write(tmp_path, "config.yaml", f"log_level: {level}\n")
    assert load_config(tmp_path).settings.log_level == expected


def test_explicit_zeros_mean_zero_not_the_default(tmp_path):
    write(tmp_path, "config.yaml", """\
        reactivate_after: 0
        upstream_idle_timeout: 0
        log_retention_days: 0
        """)
    s = load_config(tmp_path).settings
    assert s.reactivate_after == 0
    assert s.upstream_idle_timeout == 0
    assert s.log_retention_days == 0


def test_zero_durations_written_with_a_unit_or_quoted_are_zero_too(tmp_path):
    write(tmp_path, "config.yaml", 'reactivate_after: "0"\nupstream_idle_timeout: 0s\n')
    s = load_config(tmp_path).settings
    assert (s.reactivate_after, s.upstream_idle_timeout) == (0, 0)


# --- durations -------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("3m", 180), ("1h", 3600), ("1h30m", 5400), ("2h3m4s", 7384), ("0", 0), ("0s", 0),
    ("1.5s", 1.5), ("500ms", 0.5), ("90", 90), ("1.5", 1.5), (90, 90), (0, 0), (2.5, 2.5),
])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["garbage", "5x", "1d", "s", "", "-1", "-5s", -3, "1h 30m", True, None, [1]])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_durations_in_the_file(tmp_path):
    write(tmp_path, "config.yaml", "reactivate_after: 1h30m\nupstream_idle_timeout: 120\n")
    s = load_config(tmp_path).settings
    assert (s.reactivate_after, s.upstream_idle_timeout) == (5400, 120)


# --- providers ----------------------------------------------------------------------


def test_provider_defaults(tmp_path):
    write(tmp_path, "codex.yaml", PROVIDER)
    (p,) = load_config(tmp_path).providers["codex"]
    assert p == Provider(name="p", base_url="https://api.example.com", api_key="sk-p")
    assert (p.priority, p.enabled, p.auth_header) == (1, True, None)


def test_provider_fields(tmp_path):
    write(tmp_path, "gemini.yaml", """\
        providers:
          - name: g
            base_url: https://proxy.example.com/google/
            api_key: AIza-key
            priority: 3
            enabled: false
            auth_header: Query
        """)
    (p,) = load_config(tmp_path).providers["gemini"]
    assert p == Provider("g", "https://proxy.example.com/google/", "AIza-key", 3, False, "query")


@pytest.mark.parametrize("carrier", ["x-api-key", "authorization", "x-goog-api-key", "query"])
def test_every_auth_header_value_is_accepted(tmp_path, carrier):
    write(tmp_path, "codex.yaml", PROVIDER + f"    auth_header: {carrier}\n")
    assert load_config(tmp_path).providers["codex"][0].auth_header == carrier


def test_each_file_feeds_its_own_client(tmp_path):
    for file in ("claude-code.yaml", "codex.yaml", "gemini.yaml"):
        write(tmp_path, file, PROVIDER.replace("name: p", f"name: from-{file}"))
    providers = load_config(tmp_path).providers
    assert [p.name for p in providers["claudecode"]] == ["from-claude-code.yaml"]
    assert [p.name for p in providers["codex"]] == ["from-codex.yaml"]
    assert [p.name for p in providers["gemini"]] == ["from-gemini.yaml"]


def test_priority_orders_providers_lower_first_ties_in_file_order_disabled_left_out(tmp_path):
    entries = [("a", 2, True), ("b", 1, True), ("c", 2, True), ("d", 1, False), ("e", 1, True), ("f", 0, True)]
    text = "providers:\n" + "".join(
        f"  - {{name: {n}, base_url: 'http://h{n}', api_key: k{n}, priority: {prio}, enabled: {str(on).lower()}}}\n"
        for n, prio, on in entries)
    write(tmp_path, "codex.yaml", text)
    providers = load_config(tmp_path).providers["codex"]
    assert [p.name for p in providers] == ["a", "b", "c", "d", "e", "f"]  # file order kept as loaded
    assert [p.name for p in active_providers(providers)] == ["f", "b", "e", "a", "c"]
    pool = ProviderPool(providers, reactivate_after=3600, isolate_count_tokens=False)
    assert [p.name for p in pool.providers] == ["f", "b", "e", "a", "c"]
    assert [p.name for p in pool.candidates()] == ["f", "b", "e", "a", "c"]


def test_same_provider_name_in_different_files_is_fine(tmp_path):
    write(tmp_path, "codex.yaml", PROVIDER)
    write(tmp_path, "gemini.yaml", PROVIDER)
    providers = load_config(tmp_path).providers
    assert providers["codex"][0].name == providers["gemini"][0].name == "p"


def test_secrets_lists_every_provider_key(tmp_path):
    write(tmp_path, "codex.yaml", PROVIDER)
    write(tmp_path, "gemini.yaml", PROVIDER.replace("sk-p", "AIza-g"))
    assert sorted(load_config(tmp_path).secrets()) == ["AIza-g", "sk-p"]


# --- errors: one line naming file, provider and field ------------------------------------


@pytest.mark.parametrize("text, parts", [
    ("colour: blue\n", ["colour", "unknown"]),
    ("port: 0\n", ["port", "0"]),
    ("port: 70000\n", ["port", "70000"]),
    ("port: abc\n", ["port"]),
    ("port: true\n", ["port"]),
    ("port: 3.5\n", ["port"]),
    ("port:\n", ["port"]),
    ("listen_addr: 5\n", ["listen_addr"]),
    ('listen_addr: ""\n', ["listen_addr"]),
    ("log_level: loud\n", ["log_level", "loud"]),
    ("reactivate_after: soon\n", ["reactivate_after", "soon"]),
    ("reactivate_after: -1s\n", ["reactivate_after"]),
    ("upstream_idle_timeout: -5\n", ["upstream_idle_timeout"]),
    ("upstream_idle_timeout: 5x\n", ["upstream_idle_timeout", "5x"]),
    ("max_request_body_bytes: big\n", ["max_request_body_bytes"]),
    ("max_request_body_bytes: -1\n", ["max_request_body_bytes"]),
    ("log_retention_days: -1\n", ["log_retention_days"]),
    ("log_retention_days: 1.5\n", ["log_retention_days"]),
    ("log_stdout: maybe\n", ["log_stdout"]),
    ("ignore_count_tokens_failover: 1\n", ["ignore_count_tokens_failover"]),
    ("log_dir: [a, b]\n", ["log_dir"]),
])
def test_bad_config_yaml(tmp_path, text, parts):
    write(tmp_path, "config.yaml", text)
    assert_one_line(load_error(tmp_path), "config.yaml", *parts)


def provider_file(**fields: object) -> str:
    lines = [f"    {k}: {v}\n" for k, v in fields.items() if v is not None]
    return "providers:\n  - " + "".join(lines).lstrip()


GOOD = {"name": "x", "base_url": "https://api.example.com", "api_key": "sk-x"}


@pytest.mark.parametrize("change, field", [
    ({"colour": "blue"}, "colour"),
    ({"api_key": None}, "api_key"),
    ({"api_key": '""'}, "api_key"),
    ({"api_key": "123"}, "api_key"),
    ({"base_url": None}, "base_url"),
    ({"base_url": "ftp://files.example.com"}, "base_url"),
    ({"base_url": "api.example.com/v1"}, "base_url"),
    ({"base_url": "http://"}, "base_url"),
    ({"base_url": "https:///v1"}, "base_url"),
    ({"base_url": "http://host:99999"}, "base_url"),
    ({"priority": "high"}, "priority"),
    ({"priority": "1.5"}, "priority"),
    ({"enabled": "'no'"}, "enabled"),
    ({"enabled": "1"}, "enabled"),
    ({"auth_header": "cookie"}, "auth_header"),
    ({"auth_header": "bearer"}, "auth_header"),
])
def test_bad_provider_names_file_provider_and_field(tmp_path, change, field):
    write(tmp_path, "codex.yaml", provider_file(**{**GOOD, **change}))
    error = load_error(tmp_path)
    text = assert_one_line(error, "codex.yaml", 'provider "x"', field)
    assert (error.file, error.provider) == ("codex.yaml", "x")
    assert text.startswith('codex.yaml: provider "x": ')


def test_missing_api_key_reads_like_the_spec_example(tmp_path):
    write(tmp_path, "codex.yaml", provider_file(name="x", base_url="https://api.example.com"))
    assert str(load_error(tmp_path)) == 'codex.yaml: provider "x": api_key is required'


def test_missing_name_points_at_the_entry(tmp_path):
    write(tmp_path, "claude-code.yaml", PROVIDER + "  - base_url: https://b.example.com\n    api_key: sk-b\n")
    error = load_error(tmp_path)
    assert_one_line(error, "claude-code.yaml", "name", "#2")


def test_duplicate_provider_name(tmp_path):
    write(tmp_path, "gemini.yaml", PROVIDER + PROVIDER.removeprefix("providers:\n"))
    assert_one_line(load_error(tmp_path), "gemini.yaml", 'provider "p"', "duplicate")


@pytest.mark.parametrize("text, parts", [
    ("providers: [\n", ["YAML"]),
    ("providers:\n\t- name: x\n", ["YAML"]),
    ("- just\n- a list\n", ["mapping"]),
    ("just a string\n", ["mapping"]),
    ("provider:\n  - name: x\n", ["provider", "unknown"]),
    ("providers: {name: x}\n", ["providers", "list"]),
    ("providers:\n  - hello\n", ["#1", "mapping"]),
])
def test_malformed_provider_file(tmp_path, text, parts):
    write(tmp_path, "codex.yaml", text)
    assert_one_line(load_error(tmp_path), "codex.yaml", *parts)


@pytest.mark.parametrize("text", ["port: [1\n", "a: b: c\n", "- 1\n- 2\n", "42\n"])
def test_broken_or_non_mapping_config_yaml(tmp_path, text):
    write(tmp_path, "config.yaml", text)
    assert_one_line(load_error(tmp_path), "config.yaml")


def test_a_provider_name_with_a_line_break_still_gives_one_line(tmp_path):
    write(tmp_path, "codex.yaml", provider_file(name='"x\\ny"', base_url="https://a.example.com"))
    text = assert_one_line(load_error(tmp_path), "codex.yaml", "api_key")
    assert "x" in text and "y" in text


def test_not_utf8(tmp_path):
    tmp_path.joinpath("codex.yaml").write_bytes(b"providers:\n  - name: \xff\xfe\n")
    assert_one_line(load_error(tmp_path), "codex.yaml")


def test_the_first_bad_file_is_reported_even_when_others_are_fine(tmp_path):
    write(tmp_path, "config.yaml", "port: 4000\n")
    write(tmp_path, "codex.yaml", PROVIDER)
    write(tmp_path, "gemini.yaml", provider_file(name="g", base_url="https://g.example.com"))
    assert str(load_error(tmp_path)) == 'gemini.yaml: provider "g": api_key is required'
