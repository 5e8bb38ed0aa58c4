"""Configuration parsing and validation (SPEC §2, §1 "invalid configuration").

Unit tests over clipal.config: every key of config.yaml with its default,
explicit zeros, durations, provider defaults and ordering, and one test per
kind of mistake a user can make, each checked to produce a ConfigError that
reads as ONE line naming the file, the provider (when any) and the field.
"""

from __future__ import annotations

import hashlib
import textwrap
import time
from pathlib import Path

import pytest

from clipal.classify import provider_failure
from clipal.config import (
    BreakerSettings,
    ClientFile,
    ConfigError,
    Provider,
    Settings,
    active_providers,
    load_config,
    parse_client_file,
    parse_duration,
    parse_providers,
)
from clipal.routing import Routing
from clipal.store import MemoryStore


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
    assert s.circuit_breaker == BreakerSettings(failure_threshold=4, success_threshold=2, open_timeout=60)
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
        circuit_breaker: {{failure_threshold: 3, success_threshold: 1, open_timeout: 10s}}
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
        circuit_breaker=BreakerSettings(3, 1, 10.0),
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


# --- circuit_breaker ---------------------------------------------------------------


def test_circuit_breaker_defaults():
    default = Settings().circuit_breaker
    assert default == BreakerSettings(failure_threshold=4, success_threshold=2, open_timeout=60.0)
    assert default.enabled


@pytest.mark.parametrize("text, expected", [
    ("circuit_breaker:\n", BreakerSettings()),
    ("circuit_breaker: {}\n", BreakerSettings()),
    ("circuit_breaker: {failure_threshold: 7}\n", BreakerSettings(7, 2, 60.0)),
    ("circuit_breaker: {success_threshold: 1}\n", BreakerSettings(4, 1, 60.0)),
    ("circuit_breaker: {open_timeout: 1m30s}\n", BreakerSettings(4, 2, 90.0)),
    ("circuit_breaker: {open_timeout: 500ms}\n", BreakerSettings(4, 2, 0.5)),
    ("circuit_breaker: {open_timeout: 45}\n", BreakerSettings(4, 2, 45.0)),
    ("circuit_breaker:\n  failure_threshold: 0\n  success_threshold: 3\n  open_timeout: 2h\n",
     BreakerSettings(0, 3, 7200.0)),
])
def test_circuit_breaker_keys_are_each_optional(tmp_path, text, expected):
    write(tmp_path, "config.yaml", text)
    assert load_config(tmp_path).settings.circuit_breaker == expected


def test_failure_threshold_zero_turns_the_breaker_off():
    assert not BreakerSettings(failure_threshold=0).enabled
    assert BreakerSettings(failure_threshold=1).enabled


@pytest.mark.parametrize("text, message", [
    ("circuit_breaker: 4\n", "circuit_breaker must be a mapping of failure_threshold, success_threshold or "
                              "open_timeout, got a number"),
    ("circuit_breaker: [4]\n", "circuit_breaker must be a mapping of failure_threshold, success_threshold or "
                                "open_timeout, got a list"),
    ("circuit_breaker: {failures: 4}\n", "circuit_breaker has an unknown key 'failures' (use failure_threshold, "
                                          "success_threshold or open_timeout)"),
    ("circuit_breaker: {failure_threshold: -1}\n", "circuit_breaker failure_threshold must be zero or positive, "
                                                    "got -1"),
    ("circuit_breaker: {failure_threshold: 2.5}\n", "circuit_breaker failure_threshold must be an integer, "
                                                     "got a number"),
    ("circuit_breaker: {failure_threshold: true}\n", "circuit_breaker failure_threshold must be an integer, "
                                                      "got a boolean"),
    ("circuit_breaker: {failure_threshold: null}\n", "circuit_breaker failure_threshold must be an integer, "
                                                      "got nothing"),
    ("circuit_breaker: {success_threshold: 0}\n", "circuit_breaker success_threshold must be positive, got 0"),
    ("circuit_breaker: {success_threshold: '2'}\n", "circuit_breaker success_threshold must be an integer, "
                                                     "got a string"),
    ("circuit_breaker: {open_timeout: 0}\n", "circuit_breaker open_timeout must be a duration above zero, got 0"),
    ("circuit_breaker: {open_timeout: 0s}\n", "circuit_breaker open_timeout must be a duration above zero, "
                                               "got '0s'"),
    ("circuit_breaker: {open_timeout: soon}\n", "circuit_breaker open_timeout invalid duration 'soon' "
                                                 "(use e.g. 90s, 3m, 1h30m, 0)"),
    ("circuit_breaker: {open_timeout: -5s}\n", "circuit_breaker open_timeout invalid duration '-5s' "
                                                "(use e.g. 90s, 3m, 1h30m, 0)"),
])
def test_bad_circuit_breaker(tmp_path, text, message):
    write(tmp_path, "config.yaml", text)
    assert str(load_error(tmp_path)) == f"config.yaml: {message}"


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
    assert p == Provider(name="p", base_url="https://api.example.com", api_keys=("sk-p",))
    assert (p.priority, p.enabled, p.auth_header) == (1, True, None)
    assert p.api_key == "sk-p"


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
    assert p == Provider("g", "https://proxy.example.com/google/", ("AIza-key",), 3, False, "query")


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
    routing = Routing({"codex": providers}, store=MemoryStore(time.time), clock=time.time, reactivate_after=3600,
                      isolate_count_tokens=False, breaker=BreakerSettings())
    walk = routing.client("codex").walk()
    tried = []
    for attempt in walk:  # every one fails without a hint: the walk visits each once, in order
        tried.append(attempt.provider.name)
        walk.failed(attempt, provider_failure("test"))
    assert tried == ["f", "b", "e", "a", "c"]


def test_same_provider_name_in_different_files_is_fine(tmp_path):
    write(tmp_path, "codex.yaml", PROVIDER)
    write(tmp_path, "gemini.yaml", PROVIDER)
    providers = load_config(tmp_path).providers
    assert providers["codex"][0].name == providers["gemini"][0].name == "p"


def test_secrets_lists_every_provider_key(tmp_path):
    write(tmp_path, "codex.yaml", PROVIDER)
    write(tmp_path, "gemini.yaml", PROVIDER.replace("sk-p", "AIza-g"))
    write(tmp_path, "claude-code.yaml", provider_file(name="c", base_url="https://c.example.com",
                                                      api_keys="[sk-c1, sk-c2, sk-c3]"))
    write(tmp_path, "config.yaml", "access_tokens: [an-access-token-0123456789]\n")
    assert sorted(load_config(tmp_path).secrets()) == ["AIza-g", "an-access-token-0123456789", "sk-c1", "sk-c2",
                                                        "sk-c3", "sk-p"]


# --- several keys per provider --------------------------------------------------------


def test_api_keys_are_kept_in_order_and_trimmed_and_api_key_is_the_first(tmp_path):
    write(tmp_path, "codex.yaml", provider_file(name="x", base_url="https://api.example.com",
                                                api_keys='["  sk-one ", sk-two, "sk-three\\t"]'))
    (p,) = load_config(tmp_path).providers["codex"]
    assert p.api_keys == ("sk-one", "sk-two", "sk-three")
    assert p.api_key == "sk-one"


def test_api_key_is_trimmed_and_becomes_a_one_key_tuple(tmp_path):
    write(tmp_path, "codex.yaml", provider_file(name="x", base_url="https://api.example.com", api_key='" sk-x\\n"'))
    (p,) = load_config(tmp_path).providers["codex"]
    assert (p.api_keys, p.api_key) == (("sk-x",), "sk-x")


def test_api_key_is_read_only():
    p = Provider("x", "https://api.example.com", ("sk-1", "sk-2"))
    with pytest.raises(AttributeError):
        p.api_key = "sk-3"  # type: ignore[misc]


KEY = "sk-SECRET-key-value-0123"


@pytest.mark.parametrize("keys, message", [
    ({"api_key": KEY, "api_keys": f"[{KEY}-2]"},
     "api_key and api_keys are both set; use api_keys alone for several keys"),
    ({}, "api_key is required"),
    ({"api_keys": "[]"}, "api_keys must not be empty"),
    ({"api_keys": "null"}, "api_keys must be a list of keys, got nothing"),
    ({"api_keys": "''"}, "api_keys must be a list of keys, got a string (use api_key for one key)"),
    ({"api_keys": KEY}, "api_keys must be a list of keys, got a string (use api_key for one key)"),
    ({"api_keys": "{a: b}"}, "api_keys must be a list of keys, got a mapping"),
    ({"api_keys": f'[{KEY}, ""]'}, "api_keys item 2 is empty"),
    ({"api_keys": f'[{KEY}, "   "]'}, "api_keys item 2 is empty"),
    ({"api_keys": f"[{KEY}, 12345]"}, "api_keys item 2 must be a string, got a number"),
    ({"api_keys": f"[{KEY}, [{KEY}]]"}, "api_keys item 2 must be a string, got a list"),
    ({"api_keys": f"[{KEY}-a, {KEY}-b, {KEY}-a]"}, "api_keys item 3 duplicates item 1"),
    ({"api_keys": f'["{KEY}", " {KEY}  "]'}, "api_keys item 2 duplicates item 1"),  # equal once trimmed
    ({"api_keys": f'[{KEY}, "{KEY[:5]} {KEY[5:]}"]'}, "api_keys item 2 has whitespace inside (character 6"),
    ({"api_keys": f'["{KEY}\\u0007"]'}, "api_keys item 1 has a control or invisible character inside"),
    ({"api_key": f'"{KEY[:5]}\\n{KEY[5:]}"'}, "api_key has whitespace inside (character 6"),
    ({"api_key": f'"{KEY}\\u200b"'}, "api_key has a control or invisible character inside"),
    ({"api_key": '"  "'}, "api_key is required"),
])
def test_bad_keys_are_named_by_position_never_by_value(tmp_path, keys, message):
    write(tmp_path, "codex.yaml", provider_file(name="x", base_url="https://api.example.com", **keys))
    text = str(load_error(tmp_path))
    assert text.startswith(f'codex.yaml: provider "x": {message}')
    assert KEY[:5] not in text


def test_a_provider_needs_a_non_empty_tuple_of_keys_when_built_by_hand():
    for keys in ((), "sk-abc", ("sk-a", ""), ["sk-a"]):
        with pytest.raises(ValueError, match="api_keys must be a non-empty tuple"):
            Provider("x", "https://api.example.com", keys)  # type: ignore[arg-type]


def test_the_repr_of_a_provider_shows_no_key():
    p = Provider("x", "https://api.example.com", (KEY, KEY + "-2"))
    assert KEY not in repr(p) and "x" in repr(p)


# --- identity: state that survives a reload ------------------------------------------


def _provider(name: str = "x", base_url: str = "https://api.example.com", keys: tuple[str, ...] = ("sk-1", "sk-2"),
              **extra: object) -> Provider:
    return Provider(name, base_url, keys, **extra)  # type: ignore[arg-type]


def test_identity_is_a_sha256_hex_digest_stable_across_equal_providers():
    identity = _provider().identity
    assert len(identity) == 64 and int(identity, 16) >= 0
    assert _provider().identity == identity
    # what only decides the order or the carrier is not part of who the provider is
    assert _provider(priority=5, enabled=False, auth_header="query").identity == identity


def test_identity_is_the_same_when_the_file_is_read_again(tmp_path):
    write(tmp_path, "codex.yaml", provider_file(name="x", base_url="https://api.example.com",
                                                api_keys="[sk-1, sk-2]"))
    (first,) = load_config(tmp_path).providers["codex"]
    write(tmp_path, "codex.yaml", provider_file(name="x", base_url="https://api.example.com",
                                                api_keys="[' sk-1', sk-2]", priority=2))
    (again,) = load_config(tmp_path).providers["codex"]
    assert again.identity == first.identity == _provider().identity


def test_identity_changes_with_name_url_each_key_and_their_order():
    identity = _provider().identity
    others = [_provider(name="y"), _provider(base_url="https://api.example.com/v1"), _provider(keys=("sk-1",)),
              _provider(keys=("sk-1", "sk-3")), _provider(keys=("sk-2", "sk-1")),
              _provider(keys=("sk-1", "sk-2", "sk-3"))]
    identities = [other.identity for other in others]
    assert identity not in identities and len(set(identities)) == len(identities)


def test_identity_does_not_confuse_where_one_field_ends_and_the_next_begins():
    assert _provider(name="ab", base_url="https://c.example.com").identity != \
        _provider(name="a", base_url="bhttps://c.example.com").identity
    assert _provider(keys=("sk-ab", "sk-c")).identity != _provider(keys=("sk-a", "sk-bsk-c")).identity


def test_identity_never_contains_a_key_nor_a_key_digest():
    p = _provider(keys=(KEY, KEY + "-2"))
    digests = [hashlib.sha256(key.encode()).hexdigest() for key in p.api_keys]
    assert KEY not in p.identity and p.identity not in digests
    assert KEY not in p.key_id(0) + p.key_id(1)


def test_key_id_is_a_short_sha256_prefix_of_that_key():
    p = _provider(keys=(KEY, KEY + "-2"))
    assert p.key_id(0) == hashlib.sha256(KEY.encode()).hexdigest()[:12]
    assert p.key_id(1) == hashlib.sha256((KEY + "-2").encode()).hexdigest()[:12]
    assert p.key_id(0) != p.key_id(1)
    assert p.key_id(-1) == p.key_id(1)
    with pytest.raises(IndexError):
        p.key_id(2)


# --- mode: auto or manual with a pinned provider ----------------------------------------

TWO = ("providers:\n  - {name: a, base_url: 'https://a.example.com', api_key: sk-a}\n"
       "  - {name: b, base_url: 'https://b.example.com', api_key: sk-b, priority: 2}\n"
       "  - {name: 'off', base_url: 'https://c.example.com', api_key: sk-c, enabled: false}\n")


def test_mode_is_auto_by_default_and_nothing_is_pinned(tmp_path):
    write(tmp_path, "codex.yaml", TWO)
    write(tmp_path, "gemini.yaml", TWO + "mode: auto\n")
    config = load_config(tmp_path)
    assert dict(config.pinned) == {}
    assert [config.mode(name) for name in ("claudecode", "codex", "gemini")] == ["auto"] * 3


def test_manual_mode_pins_the_named_provider_of_that_file_only(tmp_path):
    write(tmp_path, "codex.yaml", "mode: manual\npinned_provider: b\n" + TWO)
    write(tmp_path, "gemini.yaml", TWO)
    write(tmp_path, "claude-code.yaml", TWO + "mode: Manual\npinned_provider: a\n")
    config = load_config(tmp_path)
    assert dict(config.pinned) == {"codex": "b", "claudecode": "a"}
    assert (config.mode("codex"), config.mode("gemini"), config.mode("claudecode")) == ("manual", "auto", "manual")
    assert [p.name for p in config.providers["codex"]] == ["a", "b", "off"]  # the providers are unchanged


def test_parse_client_file_says_what_the_file_says():
    document = {"mode": "manual", "pinned_provider": "a",
                "providers": [{"name": "a", "base_url": "https://a.example.com", "api_key": "sk-a"}]}
    parsed = parse_client_file(document, "codex.yaml")
    assert parsed == ClientFile((Provider("a", "https://a.example.com", ("sk-a",)),), "a")
    assert parse_client_file(None, "codex.yaml") == ClientFile((), None)
    assert parse_providers(document, "codex.yaml") == parsed.providers


@pytest.mark.parametrize("text, message", [
    ("mode: manual\n", "mode: manual needs pinned_provider, the name of an enabled provider"),
    ("mode: manual\npinned_provider: ''\n", "mode: manual needs pinned_provider, the name of an enabled provider"),
    ("mode: manual\npinned_provider: zed\n", 'pinned_provider "zed" is not a provider of this file'),
    ("mode: manual\npinned_provider: A\n", 'pinned_provider "A" is not a provider of this file'),
    ("mode: manual\npinned_provider: 'off'\n", 'pinned_provider "off" is disabled (enabled: false)'),
    ("mode: manual\npinned_provider: [a]\n", "pinned_provider must be a provider name, got a list"),
    ("pinned_provider: a\n", "pinned_provider is set but mode is auto; add mode: manual to pin it, "
                              "or remove pinned_provider"),
    ("mode: auto\npinned_provider: a\n", "pinned_provider is set but mode is auto; add mode: manual to pin it, "
                                           "or remove pinned_provider"),
    ("mode: pinned\n", "mode must be auto or manual, got 'pinned'"),
    ("mode: true\n", "mode must be a string, got a boolean"),
    ("pinned: a\n", "unknown key 'pinned'"),
])
def test_bad_mode_or_pinned_provider(tmp_path, text, message):
    write(tmp_path, "codex.yaml", TWO + text)
    assert str(load_error(tmp_path)) == f"codex.yaml: {message}"


def test_manual_mode_in_a_file_without_providers_names_no_provider(tmp_path):
    write(tmp_path, "gemini.yaml", "mode: manual\npinned_provider: a\n")
    assert str(load_error(tmp_path)) == 'gemini.yaml: pinned_provider "a" is not a provider of this file'


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
