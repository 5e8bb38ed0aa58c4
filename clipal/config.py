"""Configuration: parse and validate the YAML files into frozen dataclasses.

Everything a running clipal knows about its configuration comes from
:func:`load_config`. Validation is strict (unknown keys, wrong types,
duplicate names are errors) because a typo in a YAML file should fail loudly
at start, or keep the old configuration during a hot reload, rather than
silently change which provider receives a user's requests.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Generic, Mapping, Sequence, TypeVar, get_type_hints
from urllib.parse import urlsplit, urlunsplit

import yaml

from .access import AccessToken
from .clients import CLIENTS

CONFIG_FILE = "config.yaml"

#: The largest config file read. A real one is a few KB; YAML is parsed at about 3 s per MiB,
#: and a hot reload holds the GIL for much of that, so anything bigger is refused unparsed.
MAX_CONFIG_BYTES = 1024 * 1024

#: The values of a provider's auth_header: where its key goes instead of the client's usual place.
AUTH_CARRIERS = ("x-api-key", "authorization", "x-goog-api-key", "query")

#: Every log level name config.yaml and --log-level accept, with its :mod:`logging` level.
#: "warning" is Python's spelling of warn: the same level, stored and shown as "warn".
LOG_LEVELS: Mapping[str, int] = MappingProxyType({
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
})


def _first_name_of_each_level() -> dict[int, str]:
    names: dict[int, str] = {}
    for name, number in LOG_LEVELS.items():
        names.setdefault(number, name)
    return names


#: The name each level is stored and shown under: the first one declared for its number.
_LEVEL_NAMES: Mapping[int, str] = MappingProxyType(_first_name_of_each_level())

#: The levels as messages list them: debug, info, warn, error.
LOG_LEVEL_NAMES: tuple[str, ...] = tuple(_LEVEL_NAMES.values())


class ConfigError(ValueError):
    """A configuration problem, rendered as one line naming file, provider and field.

    Example: ``codex.yaml: provider "x": api_key is required``.
    """

    def __init__(self, file: str, message: str, *, provider: str | None = None) -> None:
        self.file = file
        self.provider = provider
        self.message = message
        where = f'provider "{_printable(provider)}": ' if provider is not None else ""
        super().__init__(f"{file}: {where}{message}")


def _printable(text: str) -> str:
    """``text`` with line breaks and other control characters escaped, so the error stays one line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


#: Hex digits of a key's SHA-256 in :meth:`Provider.key_id`: enough to tell a provider's keys apart.
KEY_ID_LENGTH = 12


@dataclass(frozen=True)
class Provider:
    name: str
    base_url: str
    #: Tried in this order; one element for a provider written with ``api_key``. Left out of
    #: the repr so that logging or printing a Provider never shows a key.
    api_keys: tuple[str, ...] = field(repr=False)
    priority: int = 1
    enabled: bool = True
    auth_header: str | None = None

    def __post_init__(self) -> None:
        # A bare string would pass as a tuple of one-character "keys"; an empty tuple leaves
        # nothing to send. parse_providers never builds either; code and tests that construct
        # a Provider by hand get the mistake at once instead of at the first request.
        if not isinstance(self.api_keys, tuple) or not self.api_keys or \
                not all(isinstance(key, str) and key for key in self.api_keys):
            raise ValueError(f"provider {self.name!r}: api_keys must be a non-empty tuple of non-empty strings")

    @property
    def api_key(self) -> str:
        """The first key, for code that has one key in mind."""
        return self.api_keys[0]

    @functools.cached_property
    def identity(self) -> str:
        """A stable name for this provider as configured, for state kept across reloads.

        The SHA-256 of its name, base_url and the SHA-256 of each key in order: the same
        entry in a reloaded file has the same identity, while a changed URL or key list
        makes it a new provider. The keys enter only as digests of digests, so the identity
        can be logged or stored without revealing them.
        """
        return _sha256(json.dumps([self.name, self.base_url, [_sha256(key) for key in self.api_keys]]))

    def key_id(self, index: int) -> str:
        """A short name for key ``index`` (0-based) that never shows its value: a SHA-256 prefix."""
        return self._key_ids[index]

    @functools.cached_property
    def _key_ids(self) -> tuple[str, ...]:
        # Asked on every request's walk: hashed once per configuration, not once per request.
        return tuple(_sha256(key)[:KEY_ID_LENGTH] for key in self.api_keys)


# --- durations --------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> float:
    """Parse a Go-style duration (``90s``, ``3m``, ``1h30m``, ``0``) or a number of seconds.

    Returns seconds. Raises ValueError for anything else, including negatives.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration like 90s, 3m, 1h30m or a number of seconds")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        else:
            pos, seconds = 0, 0.0
            while pos < len(text):
                match = _DURATION_PART.match(text, pos)
                if not match:
                    raise ValueError(f"invalid duration {value!r} (use e.g. 90s, 3m, 1h30m, 0)")
                seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
                pos = match.end()
            if not text:
                raise ValueError("empty duration")
    else:
        raise ValueError("expected a duration like 90s, 3m, 1h30m or a number of seconds")
    if seconds < 0 or math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"invalid duration {value!r}: must be zero or positive")
    return seconds


def format_duration(seconds: float) -> str:
    """Go-style text for log lines and messages: ``1h0m``, ``2m30s``, ``45s``, ``500ms``.

    The inverse of :func:`parse_duration` for what clipal prints: whole
    seconds, or milliseconds below one second.
    """
    millis = round(seconds * 1000)
    if 0 < millis < 1000:
        return f"{millis}ms"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:  # "1h", "1h30m", "1h0m5s": minutes are spelled out when seconds follow
        return f"{hours}h" + (f"{minutes}m" if minutes or secs else "") + (f"{secs}s" if secs else "")
    return (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs or not minutes else "")


# --- field checkers -----------------------------------------------------------
# Each takes the raw YAML value and returns the typed value or raises ValueError
# with a message that completes "<field> ...".


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {_type_name(value)}")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {_type_name(value)}")
    return value


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, got {_type_name(value)}")
    return value


def _port(value: object) -> int:
    port = _integer(value)
    if not 1 <= port <= 65535:
        raise ValueError(f"must be between 1 and 65535, got {port}")
    return port


def _non_negative(value: object) -> int:
    number = _integer(value)
    if number < 0:
        raise ValueError(f"must be zero or positive, got {number}")
    return number


def _positive(value: object) -> int:
    number = _integer(value)
    if number <= 0:
        raise ValueError(f"must be positive, got {number}")
    return number


def _one_of(value: object, names: Sequence[str] | Mapping[str, object], shown: Sequence[str]) -> str:
    """``value`` as one of ``names`` (case and surrounding blanks ignored); the message lists ``shown``."""
    name = _string(value).strip().lower()
    if name not in names:
        raise ValueError(f"must be one of {', '.join(shown)}, got {value!r}")
    return name


def _log_level(value: object) -> str:
    return _LEVEL_NAMES[LOG_LEVELS[_one_of(value, LOG_LEVELS, LOG_LEVEL_NAMES)]]


def _listen_addr(value: object) -> str:
    addr = _string(value).strip()
    if not addr:
        raise ValueError("must not be empty")
    return addr


#: Access tokens are secrets a client types into its key setting; shorter ones are guessable.
MIN_TOKEN_LENGTH = 16


def _access_tokens(value: object) -> tuple[AccessToken, ...]:
    """``access_tokens``: token strings (named token-1, token-2, ... by position) or {name, token}.

    Messages name an item by its position, never by its token.
    """
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"must be a list of tokens, got {_type_name(value)}")
    tokens: list[AccessToken] = []
    for position, item in enumerate(value, start=1):
        where = f"item {position}"
        if isinstance(item, AccessToken):  # already checked (a default, or a value passed back in)
            name, token = item.name, item.token
        elif isinstance(item, str):
            name, token = f"token-{position}", item
        elif isinstance(item, dict):
            unknown = sorted(set(map(str, item)) - {"name", "token"})
            if unknown:
                raise ValueError(f"{where}: unknown key {unknown[0]!r} (use name and token)")
            if not isinstance(item.get("name"), str) or not item["name"].strip():
                raise ValueError(f"{where}: name is required (a string)")
            if not isinstance(item.get("token"), str):
                raise ValueError(f"{where}: token is required (a string)")
            name, token = item["name"].strip(), item["token"]
        else:
            raise ValueError(f"{where} must be a token string or a {{name, token}} mapping, got {_type_name(item)}")
        token = token.strip()
        if any(ch.isspace() or not ch.isprintable() for ch in token):
            raise ValueError(f"{where}: the token must not contain whitespace or control characters")
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"{where}: the token must be at least {MIN_TOKEN_LENGTH} characters")
        for earlier_position, earlier in enumerate(tokens, start=1):
            if earlier.token == token:
                raise ValueError(f"{where}: duplicate token (the same as item {earlier_position})")
            if earlier.name == name:
                raise ValueError(f"{where}: duplicate name {_printable(name)!r}")
        tokens.append(AccessToken(name, token))
    return tuple(tokens)


def _names(value: object) -> tuple[str, ...]:
    """A list of non-empty strings (origins, host names)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) and item.strip() for item in value):
        raise ValueError("must be a list of non-empty strings")
    return tuple(item.strip() for item in value)


def _type_name(value: object) -> str:
    if value is None:
        return "nothing"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class BreakerSettings:
    """``circuit_breaker``: when a provider is taken out of the rotation for failing, and how it comes back.

    After ``failure_threshold`` provider failures in a row (connect errors and resets,
    408/5xx/529/520-524, idle timeouts, broken or incomplete streams) the provider is
    tried only after every other one has failed, for ``open_timeout`` seconds; then one
    request at a time probes it, and ``success_threshold`` completed answers in a row put
    it back. ``failure_threshold: 0`` turns the breaker off.
    """

    failure_threshold: int = 4
    success_threshold: int = 2
    open_timeout: float = 60.0

    @property
    def enabled(self) -> bool:
        return self.failure_threshold > 0


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be a duration above zero, got {value!r}")
    return seconds


_BREAKER_FIELDS: Mapping[str, Callable[[object], Any]] = {
    "failure_threshold": _non_negative,
    "success_threshold": _positive,
    "open_timeout": _positive_duration,
}


def _circuit_breaker(value: object) -> BreakerSettings:
    """A mapping of some of failure_threshold, success_threshold, open_timeout; the rest keep their defaults."""
    if isinstance(value, BreakerSettings):  # already checked (the default, or a value passed back in)
        return value
    names = tuple(_BREAKER_FIELDS)
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping of {_or_list(names)}, got {_type_name(value)}")
    values: dict[str, Any] = {}
    for key, raw in value.items():
        check = _BREAKER_FIELDS.get(key)
        if check is None:
            raise ValueError(f"has an unknown key {key!r} (use {_or_list(names)})")
        try:
            values[key] = check(raw)
        except ValueError as exc:
            raise ValueError(f"{key} {exc}") from None
    return BreakerSettings(**values)


#: What ``state_url`` may name: Redis over TCP, over TLS, or over a Unix socket.
STATE_URL_SCHEMES = ("redis", "rediss", "unix")


def public_url(url: str) -> str:
    """``url`` with its password (if any) shown as ``***``: what a log line or an error may print."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # unparsable: nothing after the scheme can be trusted to hold no password
        return url.partition("://")[0] + "://..." if "://" in url else "..."
    if password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _state_url(value: object) -> str:
    """``state_url``: empty (this process's memory), or the Redis URL that processes share state through.

    Only the form is checked here; whether that Redis answers is found out while serving,
    because clipal serves without it.
    """
    url = _string(value).strip()
    if not url:
        return ""
    shown = public_url(url)
    try:
        parts = urlsplit(url)
        parts.port  # raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"is not a valid URL: {shown!r}") from None
    if parts.scheme not in STATE_URL_SCHEMES:
        raise ValueError(f"must be a redis://, rediss:// or unix:// URL (or empty for this process's memory), "
                         f"got {shown!r}")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"needs the socket's path, as in unix:///run/redis/redis.sock, got {shown!r}")
    elif not re.fullmatch(r"/?(\d+)?", parts.path):
        raise ValueError(f"may end only in a database number, as in redis://localhost:6379/0, got {shown!r}")
    return url


def _state_prefix(value: object) -> str:
    """``state_prefix``: the namespace of clipal's keys in Redis (every key is ``<prefix>:...``)."""
    prefix = _string(value).strip()
    if not prefix:
        raise ValueError("must not be empty")
    if any(ch.isspace() or not ch.isprintable() for ch in prefix):
        raise ValueError("must not contain whitespace or control characters")
    return prefix


# --- the settings of config.yaml -------------------------------------------------------
# Each setting is one Setting in SETTINGS; everything else is made from that table:
# the Settings dataclass, the keys parse_settings accepts and how it checks them,
# what a reload reports and which settings it says need a restart, the command-line
# flags. A new setting is one more entry (a list- or mapping-valued one needs only a
# checker returning that value, and any default: a mutable one is copied per Settings).

T = TypeVar("T")


@dataclass(frozen=True)
class Flag:
    """The command-line option that also sets a setting, winning over config.yaml."""

    option: str
    metavar: str
    #: What the setting's checker is given for the option's text, as if read from YAML.
    parse: Callable[[str], object] = str


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One key of config.yaml, declared once."""

    name: str
    #: Takes the raw YAML value and returns the typed one, or raises ValueError with a
    #: message that completes "<name> ...". Its return annotation is the field's type.
    check: Callable[[object], T]
    default: T
    #: One line, as --help shows it.
    help: str
    #: Only takes effect at start (the listening socket, the state store), so a reload cannot apply it.
    restart: bool = False
    flag: Flag | None = None
    #: ``key:`` with no value means the default instead of being an error.
    blank_means_default: bool = False

    @property
    def type(self) -> Any:
        return get_type_hints(self.check).get("return", Any)


def _integer_text(text: str) -> object:
    """A flag's text as an integer when it reads as one; otherwise as given, for the checker to name."""
    try:
        return int(text)
    except ValueError:
        return text


def _or_list(names: tuple[str, ...]) -> str:
    """``a, b or c`` (two names or more)."""
    return ", ".join(names[:-1]) + " or " + names[-1]


SETTINGS: tuple[Setting[Any], ...] = (
    Setting("listen_addr", _listen_addr, default="127.0.0.1", help="address to listen on", restart=True,
            flag=Flag("--listen-addr", "ADDR")),
    Setting("port", _port, default=3333, help="port to listen on", restart=True,
            flag=Flag("--port", "N", parse=_integer_text)),
    Setting("log_level", _log_level, default="info", help=_or_list(LOG_LEVEL_NAMES),
            flag=Flag("--log-level", "LEVEL")),
    Setting("reactivate_after", parse_duration, default=3600.0,
            help="how long a provider stays deactivated after an auth, billing or quota error (0 = never)"),
    Setting("circuit_breaker", _circuit_breaker, default=BreakerSettings(),
            help="consecutive provider failures that take a provider out for open_timeout, and successes that "
                 "bring it back (failure_threshold 0 = off)",
            # `circuit_breaker:` with each key below it commented out is the default too.
            blank_means_default=True),
    Setting("upstream_idle_timeout", parse_duration, default=180.0,
            help="longest wait for an upstream's response headers or its next body bytes (0 = no limit)"),
    Setting("max_request_body_bytes", _positive, default=32 * 1024 * 1024,
            help="largest request body accepted, in bytes"),
    # `log_dir:` with nothing after it, as an example file may leave it, is the default too.
    Setting("log_dir", _string, default="", help="directory of the daily log files (empty = <config dir>/logs)",
            blank_means_default=True),
    Setting("log_retention_days", _non_negative, default=7, help="days a log file is kept (0 = forever)"),
    Setting("log_stdout", _boolean, default=True, help="also write log lines to stdout"),
    Setting("ignore_count_tokens_failover", _boolean, default=False,
            help="Claude Code's count_tokens requests fail over on their own, leaving the conversation's provider"),
    Setting("access_tokens", _access_tokens, default=(),
            help="who may use clipal: each client sends one as its API key (none = only this machine)"),
    Setting("allowed_origins", _names, default=(),
            help="browser origins (Origin header) served; requests from any other web page get 403"),
    Setting("allowed_hosts", _names, default=(),
            help="Host names served besides loopback and localhost when no access_tokens are set"),
    Setting("metrics", _boolean, default=True,
            help="count requests and serve them at /metrics in Prometheus' format (false = 404, nothing counted)"),
    # The store is chosen once per process (clipal.runtime): a reload cannot move the state elsewhere.
    Setting("state_url", _state_url, default="", restart=True, blank_means_default=True,
            help="where the failover state lives: a redis://, rediss:// or unix:// URL shares it with every clipal "
                 "using that Redis and state_prefix; empty = this process's memory"),
    Setting("state_prefix", _state_prefix, default="clipal", restart=True, blank_means_default=True,
            help="namespace of clipal's keys in that Redis: processes with the same one share one failover state"),
)


def _copy_of(value: T) -> T:
    """Each Settings' own copy of a mutable default; a read-only mapping is shared as it is."""
    return value if isinstance(value, MappingProxyType) else copy.deepcopy(value)


def _field_of(setting: Setting[Any]) -> Any:
    if type(setting.default).__hash__ is None:  # a list or mapping: dataclasses take those only from a factory
        return field(default_factory=functools.partial(_copy_of, setting.default))
    return field(default=setting.default)


def _type_text(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).removeprefix("typing.")


def settings_class(table: Sequence[Setting[Any]], name: str = "Settings") -> type:
    """A frozen dataclass with a field per setting: its name, its checker's type, its default.

    The docstring lists them, so ``help(Settings)`` shows each field's type and meaning.
    """
    doc = f"The global settings of {CONFIG_FILE}, one field per declaration:\n\n" + "\n".join(
        f"{s.name} ({_type_text(s.type)}, default {s.default!r}{', needs a restart' if s.restart else ''}): {s.help}"
        for s in table)
    cls = dataclasses.make_dataclass(name, [(s.name, s.type, _field_of(s)) for s in table], frozen=True,
                                     namespace={"__doc__": doc})
    cls.__module__ = __name__
    return cls


Settings = settings_class(SETTINGS)


@dataclass(frozen=True)
class Config:
    """One consistent snapshot of every file in the config directory."""

    config_dir: Path
    settings: Settings = field(default_factory=Settings)
    #: client name -> providers in file order (all of them, enabled or not)
    providers: Mapping[str, tuple[Provider, ...]] = field(default_factory=dict)
    #: client name -> the name of its pinned provider, only for clients in ``mode: manual``
    #: (a client not listed fails over automatically). The provider is enabled and in
    #: ``providers`` of that client: load_config refuses anything else.
    pinned: Mapping[str, str] = field(default_factory=dict)

    def mode(self, client: str) -> str:
        """``manual`` for a client with a pinned provider, else ``auto``."""
        return "manual" if client in self.pinned else "auto"

    @property
    def log_dir(self) -> Path:
        return Path(self.settings.log_dir).expanduser() if self.settings.log_dir else self.config_dir / "logs"

    def secrets(self) -> list[str]:
        """Every key of every provider and every access token, for log redaction."""
        return [key for ps in self.providers.values() for p in ps for key in p.api_keys] + \
            [t.token for t in self.settings.access_tokens]


def _check_base_url(value: object) -> str:
    url = _string(value).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http(s) URL with a host, got {url!r}")
    try:
        parts.port  # raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"has an invalid port: {url!r}") from None
    if parts.query or parts.fragment:
        raise ValueError(f"must not contain a query or fragment, got {url!r}")
    return url


def _auth_header(value: object) -> str:
    return _one_of(value, AUTH_CARRIERS, AUTH_CARRIERS)


def _one_key(value: object) -> str:
    """A provider key without surrounding whitespace (a paste often brings a line break along).

    Whitespace, control or non-ASCII characters inside cannot be in an HTTP
    header, so every request would fail: that is a configuration error.
    Messages complete "<where> ..." and name the character's kind and place,
    never the key.
    """
    key = _string(value).strip()
    if not key:
        raise ValueError("is empty")
    for place, char in enumerate(key, start=1):
        if char.isspace():
            kind = "whitespace"
        elif not char.isprintable():
            kind = "a control or invisible character"
        elif not char.isascii():
            kind = "a non-ASCII character"
        else:
            continue
        raise ValueError(f"has {kind} inside (character {place} of {len(key)}; the key is not shown)")
    return key


def _api_key(value: object) -> tuple[str, ...]:
    return (_one_key(value),)


def _api_keys(value: object) -> tuple[str, ...]:
    """``api_keys``: a non-empty list of distinct keys, tried in order. Items are named by position."""
    if isinstance(value, str):
        raise ValueError("must be a list of keys, got a string (use api_key for one key)")
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"must be a list of keys, got {_type_name(value)}")
    if not value:
        raise ValueError("must not be empty")
    keys: list[str] = []
    for position, item in enumerate(value, start=1):
        try:
            key = _one_key(item)
        except ValueError as exc:
            raise ValueError(f"item {position} {exc}") from None
        if key in keys:
            raise ValueError(f"item {position} duplicates item {keys.index(key) + 1}")
        keys.append(key)
    return tuple(keys)


_PROVIDER_FIELDS: Mapping[str, Callable[[object], Any]] = {
    "name": _string,
    "base_url": _check_base_url,
    "api_key": _api_key,
    "api_keys": _api_keys,
    "priority": _integer,
    "enabled": _boolean,
    "auth_header": _auth_header,
}
_PROVIDER_REQUIRED = ("name", "base_url")
#: The two ways to give a provider its keys; exactly one of them is required.
_KEY_FIELDS = ("api_key", "api_keys")


# --- files ------------------------------------------------------------------


def _open_nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def _read_yaml(path: Path) -> Any:
    """The parsed document, or None when the file is missing or empty.

    Only regular files are read. Opening a FIFO for reading waits for a writer,
    and file I/O is not cooperative under gevent: one FIFO named codex.yaml
    would freeze the whole proxy. O_NONBLOCK makes that open return at once
    (it changes nothing for a regular file); a device could be endless.
    Files over :data:`MAX_CONFIG_BYTES` are refused by their size, and one
    that grows past it while being read is refused too.
    """
    try:
        with open(path, "rb", opener=_open_nonblocking) as f:
            status = os.fstat(f.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise ConfigError(path.name, "is not a regular file")
            if status.st_size > MAX_CONFIG_BYTES:
                raise ConfigError(path.name, _too_large(status.st_size))
            data = f.read(MAX_CONFIG_BYTES + 1)
            if len(data) > MAX_CONFIG_BYTES:
                raise ConfigError(path.name, _too_large(len(data)))
            text = data.decode("utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise ConfigError(path.name, "is not valid UTF-8") from None
    except OSError as exc:
        raise ConfigError(path.name, f"cannot be read: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(path.name, f"is not valid YAML{where}: {problem}") from None


def _too_large(size: int) -> str:
    return f"is larger than 1 MiB ({size} bytes); clipal reads config files up to {MAX_CONFIG_BYTES} bytes"


def check_settings(table: Sequence[Setting[Any]], document: Any, file: str) -> dict[str, Any]:
    """The values ``document`` sets, each checked by its declaration in ``table``.

    Keys left out (or blank where that means the default) are left out of the result.
    Raises :class:`ConfigError` for an unknown key or a value its checker refuses.
    """
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(file, f"must be a mapping of settings, got {_type_name(document)}")
    declared = {setting.name: setting for setting in table}
    values: dict[str, Any] = {}
    for key, raw in document.items():
        setting = declared.get(key)
        if setting is None:
            raise ConfigError(file, f"unknown key {key!r}")
        if raw is None and setting.blank_means_default:
            continue
        try:
            values[key] = setting.check(raw)
        except ValueError as exc:
            raise ConfigError(file, f"{key} {exc}") from None
    return values


def parse_settings(document: Any, file: str = CONFIG_FILE) -> Settings:
    return Settings(**check_settings(SETTINGS, document, file))


#: How a client picks its provider: ``auto`` fails over by priority; ``manual`` sends
#: everything to its pinned_provider.
MODES = ("auto", "manual")


@dataclass(frozen=True)
class ClientFile:
    """What one client file says: its providers and, in manual mode, the provider pinned."""

    providers: tuple[Provider, ...] = ()
    #: The name of an enabled provider of ``providers`` when the file says ``mode: manual``;
    #: None in auto mode.
    pinned: str | None = None


def _mode(value: object) -> str:
    mode = _string(value).strip().lower()
    if mode not in MODES:
        raise ValueError(f"must be {_or_list(MODES)}, got {value!r}")
    return mode


def parse_client_file(document: Any, file: str) -> ClientFile:
    """A client file: ``providers``, and beside it ``mode`` and ``pinned_provider``."""
    if document is None:
        return ClientFile()
    if not isinstance(document, dict):
        raise ConfigError(file, f"must be a mapping with a providers list, got {_type_name(document)}")
    for key in document:
        if key not in ("providers", "mode", "pinned_provider"):
            raise ConfigError(file, f"unknown key {key!r}")
    providers = _parse_provider_list(document.get("providers"), file)
    try:
        mode = _mode(document["mode"]) if document.get("mode") is not None else "auto"
    except ValueError as exc:
        raise ConfigError(file, f"mode {exc}") from None
    pinned = document.get("pinned_provider")
    if pinned is not None and not isinstance(pinned, str):
        raise ConfigError(file, f"pinned_provider must be a provider name, got {_type_name(pinned)}")
    if mode == "auto":
        if pinned is not None:
            # Silently ignoring it would leave the user believing the provider is pinned.
            raise ConfigError(file, "pinned_provider is set but mode is auto; add mode: manual to pin it, "
                                    "or remove pinned_provider")
        return ClientFile(providers)
    if pinned is None or not pinned.strip():
        raise ConfigError(file, "mode: manual needs pinned_provider, the name of an enabled provider")
    named = [p for p in providers if p.name == pinned]
    if not named:
        raise ConfigError(file, f'pinned_provider "{_printable(pinned)}" is not a provider of this file')
    if not named[0].enabled:
        raise ConfigError(file, f'pinned_provider "{_printable(pinned)}" is disabled (enabled: false)')
    return ClientFile(providers, pinned)


def parse_providers(document: Any, file: str) -> tuple[Provider, ...]:
    """The providers of a client file (all of them, enabled or not), the file checked in full."""
    return parse_client_file(document, file).providers


def _parse_provider_list(entries: Any, file: str) -> tuple[Provider, ...]:
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise ConfigError(file, f"providers must be a list, got {_type_name(entries)}")

    providers: list[Provider] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries, start=1):
        label = entry.get("name") if isinstance(entry, dict) and isinstance(entry.get("name"), str) else f"#{index}"
        if not isinstance(entry, dict):
            raise ConfigError(file, f"must be a mapping, got {_type_name(entry)}", provider=label)
        values: dict[str, Any] = {}
        for key, raw in entry.items():
            checker = _PROVIDER_FIELDS.get(key)
            if checker is None:
                raise ConfigError(file, f"unknown key {key!r}", provider=label)
            if raw is None and key == "auth_header":
                continue
            if raw is None and key in _PROVIDER_REQUIRED + ("api_key",):
                raise ConfigError(file, f"{key} is required", provider=label)
            if key == "api_key" and isinstance(raw, str) and not raw.strip():
                raise ConfigError(file, "api_key is required", provider=label)
            try:
                values[key] = checker(raw)
            except ValueError as exc:
                raise ConfigError(file, f"{key} {exc}", provider=label) from None
        for key in _PROVIDER_REQUIRED:
            if key not in values or not str(values[key]).strip():
                raise ConfigError(file, f"{key} is required", provider=label)
        given = [key for key in _KEY_FIELDS if key in values]
        if not given:
            raise ConfigError(file, "api_key is required", provider=label)
        if len(given) > 1:
            raise ConfigError(file, "api_key and api_keys are both set; use api_keys alone for several keys",
                              provider=label)
        values["api_keys"] = values.pop(given[0])
        if values["name"] in seen:
            raise ConfigError(file, "duplicate provider name", provider=values["name"])
        seen.add(values["name"])
        providers.append(Provider(**values))
    return tuple(providers)


def load_config(config_dir: Path) -> Config:
    """Read and validate every file in ``config_dir``.

    Missing directory or files are not errors: defaults apply, and a client
    without a file simply has no providers. Raises :class:`ConfigError`.
    """
    config_dir = Path(config_dir).expanduser()
    settings = parse_settings(_read_yaml(config_dir / CONFIG_FILE))
    files = {client.name: parse_client_file(_read_yaml(config_dir / client.file), client.file) for client in CLIENTS}
    return Config(config_dir=config_dir, settings=settings,
                  providers={name: f.providers for name, f in files.items()},
                  pinned={name: f.pinned for name, f in files.items() if f.pinned is not None})


def config_files(config_dir: Path) -> list[Path]:
    """Every file clipal reads, in the order they are validated."""
    return [config_dir / CONFIG_FILE] + [config_dir / client.file for client in CLIENTS]


def active_providers(providers: tuple[Provider, ...]) -> tuple[Provider, ...]:
    """Enabled providers by priority; ties keep file order (sorted() is stable)."""
    return tuple(sorted((p for p in providers if p.enabled), key=lambda p: p.priority))
