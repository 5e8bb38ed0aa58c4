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


# Runtime secrets are found through the first 8 characters of each spelling
# (_MIN_EXACT_LEN, the shortest one remembered): a spelling without whitespace
# lies inside a run of non-whitespace, and starts at one of the run's positions.
_WINDOW = _MIN_EXACT_LEN


def _runs_of(length: int) -> re.Pattern[str]:
    """Runs of non-whitespace at least ``length`` long (re caches the few lengths ever used)."""
    return re.compile(r"\S{%d,}" % max(length, _WINDOW))
_WHITESPACE = re.compile(r"\s")
# Spellings with whitespace (never a real token) are looked for one by one, so only the
# most recent few are kept: a client sending such credentials cannot slow every line down.
_SPACED_LIMIT = 16


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping or touching spans joined, in order: nothing of two overlapping secrets survives."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


class Redactor:
    """Masks known secrets and key-shaped strings in text.

    Provider keys (:meth:`set_known`) are matched with one compiled alternation
    of literals, which the regex engine scans by first character: well under a
    microsecond per line. It is rebuilt only when the configuration changes.

    Client credentials (:meth:`add`) arrive with requests, one new one per
    request at worst, so they are never compiled into a regex (that rebuild
    cost milliseconds per request and grew with the set). Each is kept with
    its spellings in a bounded LRU, and indexed by the first 8 characters of
    every spelling: adding one is a few dict operations, and a line is
    checked by looking up the 8-character windows of its runs of
    non-whitespace that are long enough to hold one, whatever the number of
    credentials. A spelling with whitespace inside is looked for with
    ``str.find``; only the last few of those are kept. A credential is
    masked in every line written after it was added.

    Readers take no lock: the index's entries and the other lookup tables are
    replaced whole, never changed in place. Writers serialise on ``_lock``
    (``threading.Lock`` is cooperative once gevent has patched it).
    """

    def __init__(self, *, runtime_limit: int = 256, runtime_chars: int = 1 << 20) -> None:
        self._lock = threading.Lock()
        self._known: frozenset[str] = frozenset()
        self._exact: re.Pattern[str] | None = None
        # The keys of a configuration being loaded, with their match compiled ahead (prepare_known).
        self._prepared: tuple[frozenset[str], re.Pattern[str] | None] | None = None
        # Client credentials, oldest first, with their spellings; bounded in number and in
        # characters so a stream of distinct bogus credentials cannot grow memory without limit.
        self._runtime: collections.OrderedDict[str, tuple[str, ...]] = collections.OrderedDict()
        self._runtime_limit = runtime_limit
        self._runtime_chars_limit = runtime_chars
        self._chars = 0
        # window -> the runtime spellings starting with it, longest first
        self._index: dict[str, tuple[str, ...]] = {}
        # How many indexed spellings have each length, and the shortest: a run shorter than it
        # holds none (so it is not even looked at), and no spelling starts closer to a run's end.
        self._lengths: collections.Counter[int] = collections.Counter()
        self._shortest = 0
        self._runs = _runs_of(0)
        # runtime spellings with whitespace, newest last (see the class docstring)
        self._spaced: tuple[str, ...] = ()
        # How many remembered credentials have each spelling: one credential's URL-encoded
        # form can be another's raw form, and forgetting one must not unmask the other.
        self._uses: collections.Counter[str] = collections.Counter()

    def set_known(self, secrets: Iterable[str]) -> None:
        """Replace the provider keys (done on every config load)."""
        known = _normalized(secrets)
        with self._lock:
            if known == self._known:
                return
            prepared = self._prepared
            self._exact = prepared[1] if prepared is not None and prepared[0] == known else _alternation(known)
            self._known = known
            self._prepared = None

    def prepare_known(self, secrets: Iterable[str]) -> None:
        """Compile the match of these provider keys now, for the :meth:`set_known` that follows.

        Compiling costs about 35 ms per thousand keys; a reload does it in its
        loading thread, so that applying the configuration on the event loop
        does not. Safe from any thread: it only replaces one reference.
        """
        known = _normalized(secrets)
        self._prepared = (known, _alternation(known))

    def add(self, secret: str) -> None:
        """Remember a credential seen at runtime: O(1), and cheap when it is already known."""
        secret = (secret or "").strip()
        if len(secret) < _MIN_EXACT_LEN or secret in self._known:
            return
        with self._lock:
            if secret in self._runtime:
                self._runtime.move_to_end(secret)
                return
            forms = tuple(sorted(_spellings(secret), key=len, reverse=True))
            self._runtime[secret] = forms
            self._chars += sum(map(len, forms))
            for form in forms:
                self._index_form(form)
            while self._runtime and (len(self._runtime) > self._runtime_limit
                                     or self._chars > self._runtime_chars_limit):
                _, old = self._runtime.popitem(last=False)
                self._chars -= sum(map(len, old))
                for form in old:
                    self._unindex_form(form)

    def runtime_chars(self) -> int:
        """The characters held for runtime credentials, all their spellings counted."""
        return self._chars

    def _index_form(self, form: str) -> None:
        self._uses[form] += 1
        if self._uses[form] > 1:
            return
        if _WHITESPACE.search(form):
            self._spaced = (*self._spaced, form)[-_SPACED_LIMIT:]
            return
        # The shortest length first: a reader that sees the new entry must not stop short of it.
        self._lengths[len(form)] += 1
        if not self._shortest or len(form) < self._shortest:
            self._runs, self._shortest = _runs_of(len(form)), len(form)
        window = form[:_WINDOW]
        self._index[window] = tuple(sorted((*self._index.get(window, ()), form), key=len, reverse=True))

    def _unindex_form(self, form: str) -> None:
        self._uses[form] -= 1
        if self._uses[form]:
            return
        del self._uses[form]
        if _WHITESPACE.search(form):
            self._spaced = tuple(f for f in self._spaced if f != form)
            return
        window = form[:_WINDOW]
        rest = tuple(f for f in self._index.get(window, ()) if f != form)
        if rest:
            self._index[window] = rest
        else:
            self._index.pop(window, None)
        self._lengths[len(form)] -= 1
        if not self._lengths[len(form)]:
            del self._lengths[len(form)]
            shortest = min(self._lengths, default=0)
            if shortest != self._shortest:
                self._shortest, self._runs = shortest, _runs_of(shortest)

    def redact(self, text: str) -> str:
        """Return ``text`` with every known or key-shaped secret masked."""
        spans = self._runtime_spans(text)
        exact = self._exact
        if spans:
            if exact is not None:
                spans.extend(match.span() for match in exact.finditer(text))
            text = _masked(text, _merge(spans))
        elif exact is not None:
            text = exact.sub(lambda m: _mask(m.group(0)), text)
        if not _may_hold_pattern(text):
            return text
        return _PATTERNS.sub(_mask_pattern, text)

    def _runtime_spans(self, text: str) -> list[tuple[int, int]]:
        """Where runtime credentials occur in ``text``."""
        spans: list[tuple[int, int]] = []
        # Read once: the runs pattern is never longer than the shortest spelling indexed.
        index, spaced, shortest, runs = self._index, self._spaced, self._shortest, self._runs
        if index:
            get = index.get
            for run in runs.finditer(text):
                start, end = run.span()
                for position in range(start, end - shortest + 1):
                    forms = get(text[position:position + _WINDOW])
                    if forms is None:
                        continue
                    for form in forms:  # longest first: a credential that contains another is masked whole
                        if text.startswith(form, position):
                            spans.append((position, position + len(form)))
                            break
        for form in spaced:
            position = text.find(form)
            while position >= 0:
                spans.append((position, position + len(form)))
                position = text.find(form, position + 1)
        return spans


def _normalized(secrets: Iterable[str]) -> frozenset[str]:
    return frozenset(s.strip() for s in secrets if s and s.strip())


def _alternation(secrets: Iterable[str]) -> re.Pattern[str] | None:
    forms: set[str] = set()
    for secret in secrets:
        forms |= _spellings(secret)
    if not forms:
        return None
    # Longest first, so a key that contains another known key is masked whole.
    ordered = sorted(forms, key=lambda s: (-len(s), s))
    return re.compile("|".join(map(re.escape, ordered)))


def _masked(text: str, spans: list[tuple[int, int]]) -> str:
    pieces: list[str] = []
    last = 0
    for start, end in spans:
        pieces.append(text[last:start])
        pieces.append(_mask(text[start:end]))
        last = end
    pieces.append(text[last:])
    return "".join(pieces)


#: The process's redactor: the log formatter and :func:`redact` share it.
REDACTOR = Redactor()


def set_secrets(secrets: Iterable[str]) -> None:
    """Replace the known provider keys."""
    REDACTOR.set_known(secrets)


def add_secret(secret: str) -> None:
    """Remember a client credential seen at runtime (the last 256 are kept, 1 M characters at most)."""
    REDACTOR.add(secret)


def redact(text: str) -> str:
    """The log redaction, for error bodies quoted in messages or forwarded."""
    return REDACTOR.redact(text)
