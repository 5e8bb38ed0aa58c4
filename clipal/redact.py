"""Key redaction: no provider key, client credential or key-shaped string survives into text.

Every log line passes through :data:`REDACTOR` as a whole (message, traceback
and all), whoever wrote it; :func:`redact` applies the same rules to error
bodies quoted in messages. Known secrets are the provider keys of the loaded
configuration (:func:`set_secrets`) and the client credentials seen at runtime
(:func:`add_secret`); patterns catch things that merely look like keys.

Only the standard library, no sockets: importing it before gevent's
monkey-patching is harmless.
"""

from __future__ import annotations

import collections
import json
import re
import threading
import urllib.parse
from collections.abc import Iterable

__all__ = ["REDACTED", "REDACTOR", "Redactor", "add_secret", "redact", "set_secrets"]

REDACTED = "[redacted]"

# Secrets shorter than this are too likely to occur in ordinary text ("test", "dummy")
# to be replaced wherever they appear; the patterns below still catch them after
# "Bearer " or "key=".
_MIN_EXACT_LEN = 8
# Below this length even a 4-character prefix is a large share of the secret.
_MIN_PREFIX_LEN = 16
_PREFIX_LEN = 4

# Things that look like credentials even when clipal has never seen them. Prefix
# groups keep the label ("Bearer ", "x-api-key: ", "key=") and mask only the value.
# The bare token shapes are case-sensitive: "AIza" and "sk-" are exact prefixes.
_PATTERNS = re.compile(
    r"""
      (?P<bearer>\bBearer\s+)(?P<bearer_val>[^\s"',;]+)
    | (?P<named>(?<![\w-])
         (?:x-goog-api-key|x-api-key|api[-_]?key|access[-_]?token|auth[-_]?token
           |client[-_]?secret|refresh[-_]?token)
         ["']?\s*[:=]\s*["']?)
      (?P<named_val>[^\s"'&,;<>(){}\[\]]+(?:\[redacted\])?)
    | (?P<query>(?<![\w-])key=)(?P<query_val>[^\s"'&,;#<>]+(?:\[redacted\])?)
    | (?P<token>(?-i:
           (?<![\w-])sk-[A-Za-z0-9_\-]{20,}                   # OpenAI, Anthropic, OpenRouter...
         | (?<![\w-])AIza[A-Za-z0-9_\-]{30,}                  # Google API keys
         | (?<![\w-])ya29\.[A-Za-z0-9_\-]{20,}                # Google OAuth access tokens
         | (?<![\w-])eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}  # JWTs
      ))
    """,
    re.IGNORECASE | re.VERBOSE,
)
# Every match of _PATTERNS contains one of these. Checking for them with `in` costs
# well under a microsecond, while the alternation above, which defeats the regex
# engine's first-character scan, costs about 15 us on a typical line that has none.
_TRIGGERS_ANY_CASE = ("bearer", "key", "token", "secret")
_TRIGGERS_EXACT_CASE = ("sk-", "AIza", "ya29.", "eyJ")


def _may_hold_pattern(text: str) -> bool:
    if any(trigger in text for trigger in _TRIGGERS_EXACT_CASE):
        return True
    lowered = text.lower()
    return any(trigger in lowered for trigger in _TRIGGERS_ANY_CASE)


def _mask(secret: str) -> str:
    """Show at most the first 4 characters of a long secret, nothing of a short one."""
    if len(secret) >= _MIN_PREFIX_LEN:
        return secret[:_PREFIX_LEN] + "..." + REDACTED
    return REDACTED


def _mask_pattern(match: re.Match[str]) -> str:
    token = match.group("token")
    if token is not None:
        return _mask(token)
    for label, value in (("bearer", "bearer_val"), ("named", "named_val"), ("query", "query_val")):
        if match.group(label) is not None:
            secret = match.group(value)
            # Already masked (by the exact pass or an earlier redact call): keep as is,
            # so redact() is idempotent and "Bearer sk-a...[redacted]" stays readable.
            if REDACTED in secret:
                return match.group(0)
            return match.group(label) + _mask(secret)
    return match.group(0)  # unreachable: every alternative has a named group


def _spellings(secret: str) -> set[str]:
    """The forms a secret takes when echoed raw, URL-encoded or inside a JSON string."""
    forms = {secret, urllib.parse.quote(secret, safe=""), json.dumps(secret)[1:-1]}
    return {form for form in forms if len(form) >= _MIN_EXACT_LEN}


class Redactor:
    """Masks known secrets and key-shaped strings in text.

    Known secrets are matched with one compiled alternation of literals, which the
    regex engine scans by first character: well under a microsecond per line even
    with hundreds of secrets. It is rebuilt only when the set changes, which costs
    a few milliseconds at the 256-credential bound and happens once per distinct
    credential. The compiled regex is swapped in as a single reference, so readers
    need no lock; writers serialise on ``_lock``. ``threading.Lock`` is
    cooperative once gevent has patched it, and uncontended otherwise.
    """

    def __init__(self, *, runtime_limit: int = 256) -> None:
        self._lock = threading.Lock()
        self._known: frozenset[str] = frozenset()
        # Client credentials, oldest first; bounded so a stream of distinct bogus
        # credentials cannot grow memory or the regex without limit.
        self._runtime: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._runtime_limit = runtime_limit
        self._exact: re.Pattern[str] | None = None

    def set_known(self, secrets: Iterable[str]) -> None:
        """Replace the provider keys (done on every config load)."""
        known = frozenset(s.strip() for s in secrets if s and s.strip())
        with self._lock:
            if known != self._known:
                self._known = known
                self._rebuild()

    def add(self, secret: str) -> None:
        """Remember a credential seen at runtime; cheap when it is already known."""
        secret = (secret or "").strip()
        if len(secret) < _MIN_EXACT_LEN or secret in self._known:
            return
        with self._lock:
            if secret in self._runtime:
                self._runtime.move_to_end(secret)
                return
            self._runtime[secret] = None
            while len(self._runtime) > self._runtime_limit:
                self._runtime.popitem(last=False)
            self._rebuild()

    def redact(self, text: str) -> str:
        """Return ``text`` with every known or key-shaped secret masked."""
        exact = self._exact
        if exact is not None:
            text = exact.sub(lambda m: _mask(m.group(0)), text)
        if not _may_hold_pattern(text):
            return text
        return _PATTERNS.sub(_mask_pattern, text)

    def _rebuild(self) -> None:
        forms: set[str] = set()
        for secret in (*self._known, *self._runtime):
            forms |= _spellings(secret)
        if not forms:
            self._exact = None
            return
        # Longest first, so a key that contains another known key is masked whole.
        ordered = sorted(forms, key=lambda s: (-len(s), s))
        self._exact = re.compile("|".join(map(re.escape, ordered)))


#: The process's redactor: the log formatter and :func:`redact` share it.
REDACTOR = Redactor()


def set_secrets(secrets: Iterable[str]) -> None:
    """Replace the known provider keys."""
    REDACTOR.set_known(secrets)


def add_secret(secret: str) -> None:
    """Remember a client credential seen at runtime (the last 256 are kept)."""
    REDACTOR.add(secret)


def redact(text: str) -> str:
    """The log redaction, for error bodies quoted in messages or forwarded."""
    return REDACTOR.redact(text)
