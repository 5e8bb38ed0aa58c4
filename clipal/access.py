"""Who may use clipal: the access rule, as one pure function.

clipal adds the owner's provider keys to every request it forwards, so
whoever can reach its port spends the owner's money. The rule:

* A request that carries an ``Origin`` header comes from a web page, not an
  agent: it is refused (403) unless that origin is in ``allowed_origins``.
  Any page the owner visits can make the browser send requests to
  127.0.0.1, CORS preflights included.
* With ``access_tokens`` configured, a request must carry one of them where
  its agent puts its own key (``Authorization: Bearer``, ``x-api-key``,
  ``x-goog-api-key`` or ``?key=``); a missing or wrong token is a 401. Each
  agent's usual key setting carries it, so set-up stays the same.
* Without tokens, clipal serves only this machine: a peer that is not
  loopback gets a 403, and so does a ``Host`` that is not loopback,
  ``localhost`` or in ``allowed_hosts`` (a DNS-rebinding page names its own
  host). ``X-Forwarded-For`` is never looked at.

Tokens are compared in constant time. Nothing here does I/O.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["AccessPolicy", "AccessToken", "Allowed", "Refused", "check", "is_loopback_address"]


@dataclass(frozen=True)
class AccessToken:
    """A token from config.yaml and the name logs know it by (``token-1`` for a bare string)."""

    name: str
    token: str

    def __repr__(self) -> str:  # a token must not reach a log line through a repr
        return f"AccessToken(name={self.name!r})"


@dataclass(frozen=True)
class AccessPolicy:
    """The access settings of one configuration."""

    tokens: tuple[AccessToken, ...] = ()
    allowed_origins: frozenset[str] = frozenset()
    allowed_hosts: frozenset[str] = frozenset()

    @classmethod
    def build(cls, tokens: Iterable[AccessToken], allowed_origins: Iterable[str],
              allowed_hosts: Iterable[str]) -> AccessPolicy:
        return cls(tuple(tokens), frozenset(_origin_key(o) for o in allowed_origins),
                   frozenset(h.lower().rstrip(".") for h in allowed_hosts))


@dataclass(frozen=True)
class Allowed:
    """Serve the request; ``token_name`` names the token it carried (None without tokens)."""

    token_name: str | None = None


@dataclass(frozen=True)
class Refused:
    """Turn the request away with ``status`` and ``message`` (the client's words, no secrets)."""

    status: int  # 401 or 403
    message: str
    reason: str  # short text for the log line


def check(policy: AccessPolicy, *, peer: str, host: str, origin: str | None,
          credentials: Sequence[str]) -> Allowed | Refused:
    """The access decision for one request.

    ``peer`` is the connection's remote address (never a forwarded-for
    header); ``host`` the Host header; ``credentials`` every client credential
    the request carries, as :func:`clipal.outbound.client_credentials` finds
    them.
    """
    if origin is not None and _origin_key(origin) not in policy.allowed_origins:
        return Refused(403, "clipal does not serve web pages: this origin is not in allowed_origins "
                            "(config.yaml)", "a browser origin not in allowed_origins")
    if policy.tokens:
        name = _matching_token(policy.tokens, credentials)
        if name is None:
            missing = not credentials
            return Refused(401, "clipal needs one of its access_tokens as the API key",
                           "no access token" if missing else "wrong access token")
        return Allowed(name)
    if not is_loopback_address(peer):
        return Refused(403, "clipal serves only this machine until access_tokens are set in config.yaml",
                       "not on this machine and no access_tokens are set")
    if not _is_local_host(host, policy.allowed_hosts):
        return Refused(403, "clipal serves only this machine: this Host is not loopback, localhost or in "
                            "allowed_hosts (config.yaml)", "a Host that is not local (DNS rebinding?)")
    return Allowed()


def _matching_token(tokens: Sequence[AccessToken], credentials: Sequence[str]) -> str | None:
    """The name of the token one of ``credentials`` equals, comparing every pair in constant time."""
    found: str | None = None
    for credential in credentials:
        given = credential.encode("utf-8", "surrogateescape")
        for token in tokens:
            if hmac.compare_digest(given, token.token.encode()) and found is None:
                found = token.name
    return found


@functools.lru_cache(maxsize=1024)  # asked on every request, of the few addresses a machine's peers have
def is_loopback_address(address: str) -> bool:
    """127.0.0.0/8, ::1 and ::ffff:127.x; an empty address is a Unix socket, on this machine too."""
    if not address:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _host_name(host: str) -> str:
    """The Host header without its port: ``[::1]:3333`` -> ``::1``, ``LocalHost.:80`` -> ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _is_local_host(host: str, allowed: frozenset[str]) -> bool:
    name = _host_name(host)
    if not name:  # no Host at all: not a browser (browsers always send one), so no rebinding
        return True
    return name == "localhost" or name.endswith(".localhost") or name in allowed or is_loopback_address(name)


def _origin_key(origin: str) -> str:
    """Origins compare case-insensitively and without a trailing slash."""
    return origin.strip().lower().rstrip("/")
