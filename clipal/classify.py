"""What an upstream answer means for failover: pure functions, no I/O.

The failover engine hands over what it saw of an attempt - status, headers,
the first (bounded) body bytes, or the first SSE event of a 2xx stream - and
gets back a :class:`Verdict`: return the answer to the client as is, or try the
next provider, possibly deactivating this one or cooling it down for a time
the upstream hinted at. Nothing here does I/O, logs or reads the clock, so each
rule can be tested on its own and lives in exactly one place.

Statuses. 401, 402, 403, 408, 429, 500, 502, 503, 504, 529 and Cloudflare's
520-524 fail over; so do two kinds of 400 below. These statuses make up
:data:`FAILOVER_STATUSES`, whose bodies the forwarder reads before deciding;
everything else is the provider's answer and goes back to the client as is.
In particular:

* 501, 505 and other unlisted 5xx are returned as is. 501 means "this
  endpoint is not implemented here" and 505 is a protocol mismatch: both are
  answers about the request, like a 404, and walking every provider would
  only hide the real answer behind a 503.
* 520-524 are Cloudflare saying the origin behind it is down, unreachable or
  slow: the same as a 502 from any other gateway.
* An ``overloaded_error`` body on a failing 5xx is classified as OVERLOADED,
  not SERVER_ERROR, so that the answer when nothing is left is 429 (come back
  soon) rather than 503.
* A 400 is about the request, and is returned as is, except where the
  provider uses it for a bad key or an empty account: Gemini answers an
  invalid key with 400 ``API_KEY_INVALID`` (an ErrorInfo reason in the
  details, or the message "API key not valid") -> AUTH as for a 401, and
  Anthropic an account out of credit with 400 ``invalid_request_error``
  "Your credit balance is too low" -> BILLING as for a 402. Another key or
  provider can serve the very same request.

Scope. A failure is about the key (AUTH, BILLING, QUOTA, RATE_LIMIT: another
key of the same provider may do) or about the provider (SERVER_ERROR,
OVERLOADED, TIMEOUT, INCOMPLETE: its other keys would fare no better, and
these are what a circuit breaker counts). :attr:`Kind.key_scoped` is that one
rule; an SSE error event takes the scope of the status its error implies.

429 bodies, in precedence order (first match wins):

1. auth markers (``invalid_api_key``, ``authentication_error``, Gemini
   ``API_KEY_INVALID``, "API key not valid", ...) -> AUTH: a bad key is the
   most certain diagnosis and never clears by waiting;
2. explicit quota/billing codes or types (``insufficient_quota``,
   ``billing_hard_limit_reached``, ``billing_error``, OpenAI's
   ``*_spend_limit_exceeded``, Anthropic's ``enforced_spend_limit_reached``,
   ...) -> QUOTA;
3. per-day limits (a Gemini ``QuotaFailure`` violation whose quotaId or
   quotaMetric is per-day, or a message about a per-day/daily limit, such as
   OpenAI's "requests per day (RPD)") -> QUOTA: a daily cap does not clear
   within any sensible cooldown;
4. for non-Google bodies only, messages about quota or billing being exhausted
   ("exceeded your current quota", "credit balance is too low", ...) -> QUOTA.
   Google bodies are excluded because Gemini says "You exceeded your current
   quota" and "Resource has been exhausted (e.g. check quota)" for per-minute
   limits too; for them only the QuotaFailure details and per-day markers of
   step 3 decide;
5. anything else, including empty, garbage, truncated or undecodable bodies
   -> RATE_LIMIT.

Every failover verdict carries the hinted cooldown, deactivating ones too: the
engine prefers deactivation, but with ``reactivate_after: 0`` a hinted wait is
still the best thing to honour.

A verdict's reason is built only from this module's own words and marker
lists, never from body text, because upstream messages can echo an API key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timezone
from email.utils import parsedate_to_datetime
from enum import Enum

from .decode import decoded

__all__ = [
    "Kind",
    "Verdict",
    "MAX_COOLDOWN",
    "RETURN",
    "classify_answer",
    "classify_response",
    "classify_sse_error",
    "provider_failure",
    "retry_hint",
]


class Kind(str, Enum):
    """Why an attempt failed over; the engine uses it for the answer when nothing is left."""

    AUTH = "auth"  # 401/403, auth-like 429, Gemini's 400 API_KEY_INVALID -> deactivate
    BILLING = "billing"  # 402, Anthropic's 400 "credit balance is too low" -> deactivate
    QUOTA = "quota"  # quota/billing-exhausted 429 -> deactivate
    RATE_LIMIT = "rate_limit"  # other 429 -> try next, cool down for the hint
    OVERLOADED = "overloaded"  # 529, overloaded_error -> try next, cool down for the hint
    SERVER_ERROR = "server_error"  # 500/502/503/504/520-524, network errors -> try next, cool down for the hint
    TIMEOUT = "timeout"  # 408, idle timeouts -> try next, cool down for the hint
    INCOMPLETE = "incomplete"  # a stream that ended without its terminal event

    @property
    def key_scoped(self) -> bool:
        """Whether the failure is about the key sent rather than the provider (module docstring)."""
        return self in _KEY_SCOPED

    @property
    def counts_for_breaker(self) -> bool:
        """Whether the failure says the provider itself is unwell.

        Exactly the provider-scoped kinds: a bad key, an empty account or a rate limit
        says nothing about the provider's health, and trying its other keys is the
        answer to those, not taking the provider out.
        """
        return not self.key_scoped


_KEY_SCOPED = frozenset({Kind.AUTH, Kind.BILLING, Kind.QUOTA, Kind.RATE_LIMIT})


@dataclass(frozen=True)
class Verdict:
    """What to do with one attempt's outcome."""

    failover: bool  # False: return the response to the client as is
    kind: Kind | None  # None when failover is False
    deactivate: bool  # AUTH / BILLING / QUOTA
    cooldown: float | None  # hinted seconds, capped at MAX_COOLDOWN; None without a hint
    reason: str  # short text for logs; never contains body text

    @property
    def key_scoped(self) -> bool:
        """A failover about the key (another key of the same provider may do); False for RETURN."""
        return self.kind is not None and self.kind.key_scoped

    @property
    def counts_for_breaker(self) -> bool:
        """A failover about the provider's health; False for RETURN."""
        return self.kind is not None and self.kind.counts_for_breaker


MAX_COOLDOWN = 3600.0
RETURN = Verdict(False, None, False, None, "")


def provider_failure(reason: str, kind: Kind = Kind.SERVER_ERROR) -> Verdict:
    """A failure clipal saw itself (network error, stall, broken stream): try next, no cooldown.

    ``reason`` is clipal's own text (no upstream body), like every verdict's.
    """
    return Verdict(failover=True, kind=kind, deactivate=False, cooldown=None, reason=reason)

# Bounds against hostile or broken upstreams: at most this much input is
# looked at, and a compressed body never decodes beyond it (bombs).
_MAX_BODY_BYTES = 1 << 20

#: Cloudflare's "the origin behind me is down" statuses, failed over as a 502.
_ORIGIN_DOWN_STATUSES = frozenset({520, 521, 522, 523, 524})
_SERVER_ERROR_STATUSES = frozenset({500, 502, 503, 504}) | _ORIGIN_DOWN_STATUSES
#: Every status that can fail over; the forwarder reads these bodies before deciding.
#: A 400 is in only for the two bodies that say the key or the account is at fault.
FAILOVER_STATUSES = frozenset({400, 401, 402, 403, 408, 429, 529}) | _SERVER_ERROR_STATUSES

# Identifiers (error type / code / Google status / ErrorInfo reason /
# details.error_code), compared lowercased.
_AUTH_IDS = frozenset(
    {
        "invalid_api_key",
        "authentication_error",
        "permission_error",
        "account_deactivated",
        "invalid_authentication",
        "organization_deactivated",
        "api_key_invalid",
        "api_key_expired",
        "unauthenticated",
        "permission_denied",
    }
)
_AUTH_PHRASES = ("api key not valid", "invalid api key", "incorrect api key", "api key expired")

_QUOTA_IDS = frozenset(
    {
        "insufficient_quota",
        "billing_hard_limit_reached",
        "billing_error",
        "billing_not_active",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "organization_usage_limit_exceeded",
        "enforced_spend_limit_reached",
        "usage_limit_reached",
        "usage_not_included",
    }
)
_QUOTA_PHRASES = (
    "exceeded your current quota",
    "insufficient quota",
    "insufficient_quota",
    "quota exhausted",
    "quota has been exhausted",
    "quota is exhausted",
    "billing hard limit",
    "credit balance is too low",
    "insufficient balance",
    "insufficient credits",
    "out of credits",
    "spend limit",
    "spending limit",
    "usage limit",
)
_PER_DAY = re.compile(r"per[ _-]?day|\bdaily\b|\brpd\b", re.IGNORECASE)

# The HTTP status an error inside a 2xx stream implies. Codes are looked up
# before types because OpenAI sends e.g. type "invalid_request_error" with
# code "invalid_api_key" for a 401.
_IMPLIED_BY_NAME = {
    # every quota/billing code is a 429 (billing_error is overridden below)
    **{quota_id: 429 for quota_id in _QUOTA_IDS},
    # Anthropic error types
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
    # OpenAI codes and types (chat completions "type" of a 429 is "requests" or "tokens")
    "invalid_api_key": 401,
    "invalid_authentication": 401,
    "account_deactivated": 401,
    "rate_limit_exceeded": 429,
    "slow_down": 429,
    "requests": 429,
    "tokens": 429,
    "server_error": 500,
    "server_is_overloaded": 503,
}
_IMPLIED_BY_GOOGLE_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "DATA_LOSS": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
# OpenAI / Go style durations: "20ms", "1s", "2m", "1m30s", "1h2m3.5s".
_DURATION = re.compile(
    r"(?:(?P<h>\d+(?:\.\d+)?)h)?"
    r"(?:(?P<m>\d+(?:\.\d+)?)m(?!s))?"
    r"(?:(?P<s>\d+(?:\.\d+)?)s)?"
    r"(?:(?P<ms>\d+(?:\.\d+)?)ms)?"
)
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


@dataclass(frozen=True)
class _ErrorInfo:
    """The fields of an error body that decisions read, in any of the three shapes."""

    code: str  # OpenAI code (string), "" if absent
    type: str  # Anthropic/OpenAI type, "" if absent
    status: str  # Google canonical status, e.g. "RESOURCE_EXHAUSTED"
    http_code: int | None  # Google/OpenAI-compatible numeric code
    extra_ids: tuple[str, ...]  # details.error_code, ErrorInfo reasons
    quota_ids: tuple[str, ...]  # QuotaFailure quotaId / quotaMetric values
    message: str
    google: bool  # Google shape: quota phrases in the message are not trusted

    def ids(self) -> list[str]:
        return [i.lower() for i in (self.code, self.type, self.status, *self.extra_ids) if i]


_NO_ERROR = _ErrorInfo("", "", "", None, (), (), "", False)


# --------------------------------------------------------------------------- public


def classify_answer(status: int, headers: Mapping[str, str], body: bytes, event: bytes | None, *,
                    now: float) -> Verdict:
    """What an attempt saw at its commit point -> return it to the client, or try the next provider.

    ``body`` is the (bounded) body read for a status that may fail over;
    ``event`` the first SSE event of a 2xx stream (decoded), or None.
    """
    if status in FAILOVER_STATUSES:
        return classify_response(status, headers, body, now=now)
    if event is not None:
        return classify_sse_error(event, now=now) or RETURN
    return RETURN


def classify_response(status: int, headers: Mapping[str, str], body: bytes, *, now: float) -> Verdict:
    """Classify a complete upstream status line, headers and (bounded) body."""
    if status not in FAILOVER_STATUSES:
        return RETURN  # never spend time decoding a body that cannot change the answer
    lowered = _lower_headers(headers)
    error_json = _decode_json_body(body, lowered.get("content-encoding", ""))
    hint = _hint(lowered, error_json, now)
    return _decide(status, _error_info(error_json), hint)


def retry_hint(headers: Mapping[str, str], error_json: object | None, *, now: float) -> float | None:
    """The longest wait the upstream asked for, in seconds, capped at MAX_COOLDOWN.

    Sources: Retry-After (delta-seconds or HTTP-date, relative to ``now``),
    retry-after-ms (milliseconds, as OpenAI sends it),
    X-RateLimit-Reset-Requests / -Tokens (durations or bare seconds) and
    Gemini's RetryInfo.retryDelay in the error details. Negative, past or
    unparseable values are ignored; None when nothing usable is there.
    """
    return _hint(_lower_headers(headers), error_json, now)


def classify_sse_error(event: bytes, *, now: float) -> Verdict | None:
    """Classify the first complete SSE event of a 2xx stream.

    Returns a failover verdict when the event is an error whose implied
    status would fail over, else None (not an error event, an error whose
    status is returned as is, or one whose status cannot be told).
    """
    name, data = _parse_sse_event(event)
    payload = _loads(data)
    error_json = _sse_error_payload(name, payload)
    if error_json is None:
        return None
    info = _error_info(error_json)
    status = _implied_status(info)
    if status not in FAILOVER_STATUSES:
        return None
    verdict = _decide(status, info, _hint({}, error_json, now))
    if not verdict.failover:  # a 400 about the request itself
        return None
    return replace(verdict, reason=f"SSE error event: {verdict.reason}")


# --------------------------------------------------------------------------- decisions


def _decide(status: int, info: _ErrorInfo, hint: float | None) -> Verdict:
    """The failover table: one status plus what its body says -> a verdict."""
    if status == 400:
        return _decide_400(info, hint)
    if status in (401, 403):
        return Verdict(True, Kind.AUTH, True, hint, f"auth error ({status})")
    if status == 402:
        return Verdict(True, Kind.BILLING, True, hint, "billing error (402)")
    if status == 429:
        return _decide_429(info, hint)
    if status == 408:
        return Verdict(True, Kind.TIMEOUT, False, hint, "timeout (408)")
    if status == 529:
        return Verdict(True, Kind.OVERLOADED, False, hint, "overloaded (529)")
    if status in _SERVER_ERROR_STATUSES:
        if "overloaded_error" in info.ids():
            return Verdict(True, Kind.OVERLOADED, False, hint, f"overloaded ({status}): overloaded_error")
        return Verdict(True, Kind.SERVER_ERROR, False, hint, f"server error ({status})")
    return RETURN


def _decide_400(info: _ErrorInfo, hint: float | None) -> Verdict:
    """Gemini's invalid key and Anthropic's empty account fail over; any other 400 is returned."""
    if any(i.lower() == "api_key_invalid" for i in info.extra_ids):
        return Verdict(True, Kind.AUTH, True, hint, "auth error (400): api_key_invalid")
    message = info.message.lower()
    if "api key not valid" in message:
        return Verdict(True, Kind.AUTH, True, hint, "auth error (400): api key not valid")
    if info.type.lower() == "invalid_request_error" and "credit balance is too low" in message:
        return Verdict(True, Kind.BILLING, True, hint, "billing error (400): credit balance is too low")
    return RETURN


def _decide_429(info: _ErrorInfo, hint: float | None) -> Verdict:
    """Auth, quota/billing or plain rate limit; precedence in the module docstring."""
    ids = info.ids()
    message = info.message.lower()

    marker = next((i for i in ids if i in _AUTH_IDS), None) or next(
        (p for p in _AUTH_PHRASES if p in message), None
    )
    if marker:
        return Verdict(True, Kind.AUTH, True, hint, f"auth error (429): {marker}")

    marker = next((i for i in ids if i in _QUOTA_IDS), None)
    if marker is None and (
        any(_PER_DAY.search(q) for q in info.quota_ids) or _PER_DAY.search(message)
    ):
        marker = "per-day quota"
    if marker is None and not info.google:
        marker = next((p for p in _QUOTA_PHRASES if p in message), None)
    if marker:
        return Verdict(True, Kind.QUOTA, True, hint, f"quota exhausted (429): {marker}")

    return Verdict(True, Kind.RATE_LIMIT, False, hint, "rate limited (429)")


def _implied_status(info: _ErrorInfo) -> int | None:
    """The HTTP status an in-stream error stands for, or None if it cannot be told."""
    if info.http_code is not None:
        return info.http_code
    for name in (info.code, info.type):
        if name.lower() in _IMPLIED_BY_NAME:
            return _IMPLIED_BY_NAME[name.lower()]
    return _IMPLIED_BY_GOOGLE_STATUS.get(info.status.upper())


# --------------------------------------------------------------------------- error bodies


def _error_object(error_json: object) -> dict | None:
    """The error object of any provider shape, or None.

    Accepts ``{"error": {...}}`` (OpenAI, Gemini, Anthropic under a top-level
    ``"type": "error"``), Gemini's stream-array form ``[{"error": {...}}]`` and
    a bare error object (OpenAI Responses error events put code and message
    at the top level).
    """
    if isinstance(error_json, list):
        error_json = error_json[0] if error_json else None
    if not isinstance(error_json, dict):
        return None
    inner = error_json.get("error")
    if isinstance(inner, dict):
        return inner
    if isinstance(inner, str):
        return {"message": inner}
    if "error" in error_json:  # {"error": null}: explicitly no error
        return None
    if any(key in error_json for key in ("code", "message")):
        return error_json
    return None


def _error_info(error_json: object) -> _ErrorInfo:
    err = _error_object(error_json)
    if err is None:
        return _NO_ERROR
    raw_code = err.get("code")
    code = raw_code if isinstance(raw_code, str) else ""
    is_status = isinstance(raw_code, int) and not isinstance(raw_code, bool) and 100 <= raw_code <= 599
    http_code = raw_code if is_status else None
    err_type = _str(err.get("type"))
    if err_type == "error":  # the OpenAI Responses event type, not an error kind
        err_type = ""
    status = _str(err.get("status"))
    extra_ids: list[str] = []
    quota_ids: list[str] = []
    google = bool(status)
    details = err.get("details")
    if isinstance(details, dict):  # Anthropic: {"details": {"error_code": ...}}
        extra_ids.append(_str(details.get("error_code")))
    elif isinstance(details, list):  # Google: typed detail messages
        for detail in details:
            if not isinstance(detail, dict):
                continue
            kind = _str(detail.get("@type"))
            if kind.startswith("type.googleapis.com/"):
                google = True
            if kind.endswith("google.rpc.ErrorInfo"):
                extra_ids.append(_str(detail.get("reason")))
            elif kind.endswith("google.rpc.QuotaFailure"):
                for violation in _list(detail.get("violations")):
                    if isinstance(violation, dict):
                        quota_ids.append(_str(violation.get("quotaId")))
                        quota_ids.append(_str(violation.get("quotaMetric")))
    return _ErrorInfo(
        code=code,
        type=err_type,
        status=status,
        http_code=http_code,
        extra_ids=tuple(i for i in extra_ids if i),
        quota_ids=tuple(q for q in quota_ids if q),
        message=_str(err.get("message")),
        google=google,
    )


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _list(value: object) -> list:
    return value if isinstance(value, list) else []


def _decode_json_body(body: bytes, content_encoding: str) -> object | None:
    """Parse an error body, decoded first (gzip, deflate, br, zstd); None if it is not JSON.

    A body that cannot be decoded is read as it came: an upstream that labels
    a plain JSON body gzip is still understood, while compressed bytes (a
    bomb stopped at the limit, a body in another coding than its header
    says) never parse as JSON.
    """
    if not body:
        return None
    data = bytes(body[:_MAX_BODY_BYTES])
    plain = decoded(data, content_encoding, limit=_MAX_BODY_BYTES)
    return _loads(plain if plain is not None else data)


def _loads(data: bytes) -> object | None:
    if not data:
        return None
    text = data.decode("utf-8", "replace").lstrip("\ufeff").strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # garbage, truncated, or absurdly nested
        return None


# --------------------------------------------------------------------------- SSE


def _parse_sse_event(event: bytes) -> tuple[str, bytes]:
    """The event name and joined data lines of one SSE event."""
    name = ""
    data_lines: list[bytes] = []
    raw = bytes(event[:_MAX_BODY_BYTES])
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    for line in raw.splitlines():
        if not line:
            break  # end of the first event
        if line.startswith(b":"):
            continue  # comment / keep-alive
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"event":
            name = value.decode("utf-8", "replace").strip()
        elif field == b"data":
            data_lines.append(value)
    return name, b"\n".join(data_lines)


def _sse_error_payload(name: str, payload: object) -> object | None:
    """The error-bearing JSON of an SSE event, or None if it reports no error."""
    event_type = payload.get("type") if isinstance(payload, dict) else None
    if name == "response.failed" or event_type == "response.failed":
        response = payload.get("response") if isinstance(payload, dict) else None
        error = response.get("error") if isinstance(response, dict) else None
        return error if isinstance(error, dict) else None
    if name == "error" or event_type == "error":
        return payload if _error_object(payload) is not None else None
    # Chat completions and Gemini put {"error": {...}} in a plain data event.
    if isinstance(payload, (dict, list)):
        first = payload[0] if isinstance(payload, list) and payload else payload
        if isinstance(first, dict) and isinstance(first.get("error"), (dict, str)):
            return payload
    return None


# --------------------------------------------------------------------------- hints


def _hint(headers: dict[str, str], error_json: object | None, now: float) -> float | None:
    candidates = [
        _retry_after(headers.get("retry-after", ""), now),
        _milliseconds(headers.get("retry-after-ms", "")),
        _duration(headers.get("x-ratelimit-reset-requests", "")),
        _duration(headers.get("x-ratelimit-reset-tokens", "")),
        _gemini_retry_delay(error_json),
    ]
    valid = [c for c in candidates if c is not None and c >= 0]
    if not valid:
        return None
    return min(max(valid), MAX_COOLDOWN)


def _retry_after(value: str, now: float) -> float | None:
    value = value.strip()
    if not value:
        return None
    if _NUMBER.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" or no zone: HTTP dates are always GMT
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp() - now  # a past date is negative, which _hint ignores


def _milliseconds(value: str) -> float | None:
    """``retry-after-ms`` (OpenAI): a wait in milliseconds, possibly fractional."""
    value = value.strip()
    return float(value) / 1000 if _NUMBER.fullmatch(value) else None


def _duration(value: str) -> float | None:
    """Seconds in an OpenAI-style duration ("1m30s", "20ms") or a bare number."""
    value = value.strip()
    if not value:
        return None
    if _NUMBER.fullmatch(value):
        return float(value)
    match = _DURATION.fullmatch(value)
    if match is None or not any(match.groupdict().values()):
        return None
    return sum(float(amount) * _DURATION_UNITS[unit] for unit, amount in match.groupdict().items() if amount)


def _gemini_retry_delay(error_json: object | None) -> float | None:
    err = _error_object(error_json)
    if err is None:
        return None
    delays = []
    for detail in _list(err.get("details")):
        if not isinstance(detail, dict) or not _str(detail.get("@type")).endswith("google.rpc.RetryInfo"):
            continue
        delay = detail.get("retryDelay")
        if isinstance(delay, str) and delay.strip().endswith("s"):
            seconds = _duration(delay)
        elif isinstance(delay, dict):  # protobuf Duration as an object
            seconds = _proto_duration(delay)
        else:
            seconds = None
        if seconds is not None:
            delays.append(seconds)
    return max(delays) if delays else None


def _proto_duration(value: dict) -> float | None:
    seconds, nanos = value.get("seconds", 0), value.get("nanos", 0)
    try:
        return float(seconds) + float(nanos) / 1e9
    except (TypeError, ValueError):
        return None


def _lower_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """A plain dict with lowercased names, whatever mapping the caller had."""
    if not headers:
        return {}
    lowered: dict[str, str] = {}
    for key, value in headers.items():
        if isinstance(key, bytes):
            key = key.decode("latin-1")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        lowered[str(key).lower()] = str(value)
    return lowered
