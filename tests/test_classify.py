"""The failover table of SPEC §4.3, row by row, and every retry-hint format."""

from __future__ import annotations

import gzip
import json
import random
import zlib
from email.utils import formatdate

import pytest
from requests.structures import CaseInsensitiveDict

from clipal.classify import (
    FAILOVER_STATUSES,
    MAX_COOLDOWN,
    RETURN,
    Kind,
    Verdict,
    classify_answer,
    classify_response,
    classify_sse_error,
    provider_failure,
    retry_hint,
)
from encoders import CODINGS, encoded, encoded_stream, raw_deflate

NOW = 1_700_000_000.0
SECRET = "sk-ant-api03-SECRETSECRET"  # echoed by some upstream messages; must never reach a reason


def anthropic(kind: str, message: str = "boom", **extra: object) -> dict:
    return {"type": "error", "error": {"type": kind, "message": message, **extra}}


def openai(message: str, kind: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def gemini(code: int, status: str, message: str, *details: dict) -> dict:
    return {"error": {"code": code, "message": message, "status": status, "details": list(details)}}


def quota_failure(*quota_ids: str) -> dict:
    return {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [
            {"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests", "quotaId": q}
            for q in quota_ids
        ],
    }


def retry_info(delay: object) -> dict:
    return {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


GEMINI_QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. "
    "For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits."
)
OPENAI_TPM_MESSAGE = (
    "Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM): Limit 30000, "
    "Used 29000, Requested 1500. Please try again in 1.2s."
)


# --------------------------------------------------------------------------- statuses

STATUS_ROWS = [
    # (status, kind, deactivate, reason)
    (401, Kind.AUTH, True, "auth error (401)"),
    (403, Kind.AUTH, True, "auth error (403)"),
    (402, Kind.BILLING, True, "billing error (402)"),
    (408, Kind.TIMEOUT, False, "timeout (408)"),
    (500, Kind.SERVER_ERROR, False, "server error (500)"),
    (502, Kind.SERVER_ERROR, False, "server error (502)"),
    (503, Kind.SERVER_ERROR, False, "server error (503)"),
    (504, Kind.SERVER_ERROR, False, "server error (504)"),
    (529, Kind.OVERLOADED, False, "overloaded (529)"),
    # Cloudflare: the origin behind it is down, refused, timed out, unreachable or slow (as a 502)
    (520, Kind.SERVER_ERROR, False, "server error (520)"),
    (521, Kind.SERVER_ERROR, False, "server error (521)"),
    (522, Kind.SERVER_ERROR, False, "server error (522)"),
    (523, Kind.SERVER_ERROR, False, "server error (523)"),
    (524, Kind.SERVER_ERROR, False, "server error (524)"),
]


@pytest.mark.parametrize("status,kind,deactivate,reason", STATUS_ROWS)
def test_failover_statuses(status, kind, deactivate, reason):
    assert classify_response(status, {}, b"", now=NOW) == Verdict(True, kind, deactivate, None, reason)


@pytest.mark.parametrize("status", [200, 201, 204, 301, 304, 400, 404, 409, 413, 422, 501, 505, 519, 525, 526, 599])
def test_other_statuses_are_returned(status):
    # Even an error-looking body cannot make a returned status fail over.
    assert classify_response(status, {"Retry-After": "9"}, body(anthropic("overloaded_error")), now=NOW) is RETURN


def test_return_constant():
    assert RETURN == Verdict(False, None, False, None, "")


def test_overloaded_error_body_on_a_5xx_counts_as_overloaded():
    verdict = classify_response(500, {}, body(anthropic("overloaded_error", "Overloaded")), now=NOW)
    assert verdict == Verdict(True, Kind.OVERLOADED, False, None, "overloaded (500): overloaded_error")


@pytest.mark.parametrize("status", [401, 402, 403, 408, 429, 500, 503, 529, 520, 524])
def test_every_failover_verdict_carries_the_hint(status):
    verdict = classify_response(status, {"Retry-After": "42"}, b"", now=NOW)
    assert verdict.failover and verdict.cooldown == 42.0


def test_an_overloaded_error_behind_cloudflare_counts_as_overloaded():
    verdict = classify_response(522, {}, body(anthropic("overloaded_error", "Overloaded")), now=NOW)
    assert verdict == Verdict(True, Kind.OVERLOADED, False, None, "overloaded (522): overloaded_error")


def test_every_status_that_can_fail_over_has_its_body_read():
    failing = {row[0] for row in STATUS_ROWS} | {400, 429}
    assert FAILOVER_STATUSES == failing


# --------------------------------------------------------------------------- 429 bodies

ROWS_429 = [
    # Anthropic
    ("anthropic auth", anthropic("authentication_error", "invalid x-api-key"), Kind.AUTH,
     "auth error (429): authentication_error"),
    ("anthropic permission", anthropic("permission_error"), Kind.AUTH, "auth error (429): permission_error"),
    ("anthropic billing", anthropic("billing_error"), Kind.QUOTA, "quota exhausted (429): billing_error"),
    ("anthropic spend limit",
     anthropic("rate_limit_error", "spend", details={"error_code": "enforced_spend_limit_reached"}), Kind.QUOTA, "quota exhausted (429): enforced_spend_limit_reached"),
    ("anthropic credit balance", anthropic("invalid_request_error",
     "Your credit balance is too low to access the Anthropic API."), Kind.QUOTA,
     "quota exhausted (429): credit balance is too low"),
    ("anthropic rate limit", anthropic("rate_limit_error",
     "This request would exceed your organization's rate limit of 50,000 input tokens per minute."),
     Kind.RATE_LIMIT, "rate limited (429)"),
    # OpenAI
    ("openai invalid key", openai(f"Incorrect API key provided: {SECRET}.", "invalid_request_error", "invalid_api_key"),
     Kind.AUTH, "auth error (429): invalid_api_key"),
    ("openai deactivated", openai("This key is associated with a deactivated account.", "invalid_request_error",
     "account_deactivated"), Kind.AUTH, "auth error (429): account_deactivated"),
    ("openai invalid authentication", openai("bad auth", "invalid_request_error", "invalid_authentication"),
     Kind.AUTH, "auth error (429): invalid_authentication"),
    ("openai insufficient_quota code", openai(GEMINI_QUOTA_MESSAGE, "insufficient_quota", "insufficient_quota"),
     Kind.QUOTA, "quota exhausted (429): insufficient_quota"),
    ("openai insufficient_quota type only", openai(GEMINI_QUOTA_MESSAGE, "insufficient_quota", None),
     Kind.QUOTA, "quota exhausted (429): insufficient_quota"),
    ("openai billing hard limit", openai("Billing hard limit has been reached", "insufficient_quota",
     "billing_hard_limit_reached"), Kind.QUOTA, "quota exhausted (429): billing_hard_limit_reached"),
    ("openai billing not active", openai("Your account is not active.", "billing_not_active", "billing_not_active"),
     Kind.QUOTA, "quota exhausted (429): billing_not_active"),
    ("openai project spend limit", openai("spend", "insufficient_quota", "project_spend_limit_exceeded"),
     Kind.QUOTA, "quota exhausted (429): project_spend_limit_exceeded"),
    ("openai-compatible quota message", openai("You exceeded your current quota.", None, None),
     Kind.QUOTA, "quota exhausted (429): exceeded your current quota"),
    ("openai per-day limit", openai("Rate limit reached for gpt-4o on requests per day (RPD): Limit 200.",
     "requests", "rate_limit_exceeded"), Kind.QUOTA, "quota exhausted (429): per-day quota"),
    ("openai tokens per minute", openai(OPENAI_TPM_MESSAGE, "tokens", "rate_limit_exceeded"),
     Kind.RATE_LIMIT, "rate limited (429)"),
    # Gemini
    ("gemini invalid key", gemini(429, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.",
     {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
      "domain": "googleapis.com"}), Kind.AUTH, "auth error (429): api_key_invalid"),
    ("gemini key message only", gemini(429, "RESOURCE_EXHAUSTED", "API key not valid."), Kind.AUTH,
     "auth error (429): api key not valid"),
    ("gemini unauthenticated", gemini(429, "UNAUTHENTICATED", "no"), Kind.AUTH, "auth error (429): unauthenticated"),
    ("gemini per-day quotaId", gemini(429, "RESOURCE_EXHAUSTED", GEMINI_QUOTA_MESSAGE,
     quota_failure("GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                   "GenerateRequestsPerDayPerProjectPerModel-FreeTier")), Kind.QUOTA,
     "quota exhausted (429): per-day quota"),
    ("gemini per-day message", gemini(429, "RESOURCE_EXHAUSTED",
     "Quota exceeded for quota metric 'Generate Content API requests per day'."), Kind.QUOTA,
     "quota exhausted (429): per-day quota"),
    ("gemini per-minute says quota", gemini(429, "RESOURCE_EXHAUSTED", GEMINI_QUOTA_MESSAGE,
     quota_failure("GenerateRequestsPerMinutePerProjectPerModel-FreeTier")), Kind.RATE_LIMIT, "rate limited (429)"),
    ("gemini check quota, no details", gemini(429, "RESOURCE_EXHAUSTED",
     "Resource has been exhausted (e.g. check quota)."), Kind.RATE_LIMIT, "rate limited (429)"),
    ("gemini stream array", [gemini(429, "RESOURCE_EXHAUSTED", GEMINI_QUOTA_MESSAGE,
     quota_failure("GenerateRequestsPerDayPerProjectPerModel"))], Kind.QUOTA, "quota exhausted (429): per-day quota"),
    # Shapes that say nothing useful
    ("error is a string", {"error": "quota exhausted"}, Kind.QUOTA, "quota exhausted (429): quota exhausted"),
    ("error is null", {"error": None}, Kind.RATE_LIMIT, "rate limited (429)"),
    ("json list", [], Kind.RATE_LIMIT, "rate limited (429)"),
    ("json string", "quota", Kind.RATE_LIMIT, "rate limited (429)"),
]


@pytest.mark.parametrize("obj,kind,reason", [row[1:] for row in ROWS_429], ids=[row[0] for row in ROWS_429])
def test_429_body(obj, kind, reason):
    verdict = classify_response(429, {"Content-Type": "application/json"}, body(obj), now=NOW)
    assert verdict == Verdict(True, kind, kind in (Kind.AUTH, Kind.QUOTA), None, reason)
    assert "secret" not in verdict.reason.lower()


QUOTA_BODY = body(openai(GEMINI_QUOTA_MESSAGE, "insufficient_quota", "insufficient_quota"))


@pytest.mark.parametrize(
    "headers,payload",
    [
        ({"Content-Encoding": "gzip"}, gzip.compress(QUOTA_BODY)),
        ({}, gzip.compress(QUOTA_BODY)),  # no header: the gzip magic is enough
        ({"content-encoding": "GZIP"}, gzip.compress(QUOTA_BODY)),
        ({"Content-Encoding": "deflate"}, zlib.compress(QUOTA_BODY)),
        ({"Content-Encoding": "gzip"}, QUOTA_BODY),  # header lied: the body is plain
        ({"Content-Encoding": "br"}, encoded("br", QUOTA_BODY)),
        ({"Content-Encoding": "zstd"}, encoded("zstd", QUOTA_BODY)),
        ({}, encoded("zstd", QUOTA_BODY)),  # no header: the zstd magic is enough
        ({"Content-Encoding": "deflate"}, raw_deflate(QUOTA_BODY)),
        ({"Content-Encoding": "gzip, br"}, encoded("br", gzip.compress(QUOTA_BODY))),
    ],
    ids=["gzip header", "gzip magic only", "header case", "deflate", "plain despite header", "br", "zstd",
         "zstd magic only", "raw deflate", "gzip then br"],
)
def test_compressed_429_body_is_decoded(headers, payload):
    assert classify_response(429, headers, payload, now=NOW).kind is Kind.QUOTA


OPENAI_QUOTA_BODY = body(openai("You exceeded your current quota", "insufficient_quota", "insufficient_quota"))


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_an_encoded_quota_429_deactivates_like_its_plain_twin(coding):
    plain = classify_response(429, {"Content-Type": "application/json"}, OPENAI_QUOTA_BODY, now=NOW)
    headers = {"Content-Type": "application/json", "Content-Encoding": coding}
    verdict = classify_response(429, headers, encoded(coding, OPENAI_QUOTA_BODY), now=NOW)
    assert verdict == plain
    assert verdict.kind is Kind.QUOTA and verdict.deactivate


BIG_NESTING = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    "headers,payload",
    [
        ({}, b""),
        ({}, b"   \r\n"),
        ({}, b"<html><body>Too Many Requests</body></html>"),
        ({}, b"\x00\xff\xfe garbage \x80"),
        ({}, QUOTA_BODY[: len(QUOTA_BODY) // 2]),  # truncated JSON
        ({"Content-Encoding": "gzip"}, gzip.compress(QUOTA_BODY)[:20]),  # truncated gzip
        ({"Content-Encoding": "gzip"}, b"\x1f\x8b" + b"\x00" * 30),  # corrupt gzip
        # bombs: decoding stops at a MiB, so the verdict never sees the tail
        ({"Content-Encoding": "gzip"}, gzip.compress(b" " * (50 << 20) + QUOTA_BODY)),
        ({"Content-Encoding": "br"}, b"".join(encoded_stream("br", [b" " * (50 << 20), QUOTA_BODY]))),
        ({"Content-Encoding": "zstd"}, b"".join(encoded_stream("zstd", [b" " * (50 << 20), QUOTA_BODY]))),
        ({"Content-Encoding": "br"}, b"\x8b\x02\x80quota"),  # truncated brotli
        ({"Content-Encoding": "zstd"}, encoded("zstd", QUOTA_BODY)[:-8]),  # truncated zstd
        ({}, BIG_NESTING),
    ],
    ids=["empty", "blank", "html", "garbage", "truncated json", "truncated gzip", "corrupt gzip",
         "gzip bomb", "brotli bomb", "zstd bomb", "truncated brotli", "truncated zstd", "deep nesting"],
)
def test_unreadable_429_body_is_a_rate_limit(headers, payload):
    assert classify_response(429, headers, payload, now=NOW) == Verdict(
        True, Kind.RATE_LIMIT, False, None, "rate limited (429)"
    )


def test_random_bytes_never_raise():
    rng = random.Random(1234)
    for _ in range(300):
        blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200)))
        for candidate in (blob, b"\x1f\x8b" + blob, b"data: " + blob + b"\n\n", b"event: error\ndata: " + blob):
            assert classify_response(429, {"Content-Encoding": "gzip"}, candidate, now=NOW).failover
            classify_sse_error(candidate, now=NOW)


# --------------------------------------------------------------------------- 400 bodies

#: What the Gemini API answers for a bad key.
GEMINI_BAD_KEY = gemini(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", {
    "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com",
    "metadata": {"service": "generativelanguage.googleapis.com"}})
#: What Anthropic answers for an account out of credit.
ANTHROPIC_NO_CREDIT = anthropic("invalid_request_error", "Your credit balance is too low to access the Anthropic "
                                                         "API. Please go to Plans & Billing to upgrade or purchase "
                                                         "credits.")
AUTH_400 = Verdict(True, Kind.AUTH, True, None, "auth error (400): api_key_invalid")
BILLING_400 = Verdict(True, Kind.BILLING, True, None, "billing error (400): credit balance is too low")

ROWS_400 = [
    ("gemini bad key", GEMINI_BAD_KEY, AUTH_400),
    ("gemini ErrorInfo reason only", gemini(400, "INVALID_ARGUMENT", f"key {SECRET} refused", {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}), AUTH_400),
    ("gemini message only", gemini(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key."),
     Verdict(True, Kind.AUTH, True, None, "auth error (400): api key not valid")),
    ("gemini stream-array shape", [GEMINI_BAD_KEY], AUTH_400),
    ("a relay's reshaped bad key", openai(f"API key not valid: {SECRET}", "invalid_request_error", None),
     Verdict(True, Kind.AUTH, True, None, "auth error (400): api key not valid")),
    ("anthropic no credit", ANTHROPIC_NO_CREDIT, BILLING_400),
    ("anthropic no credit, other case", anthropic("invalid_request_error", "Your CREDIT BALANCE IS TOO LOW."),
     BILLING_400),
]


@pytest.mark.parametrize("obj,verdict", [row[1:] for row in ROWS_400], ids=[row[0] for row in ROWS_400])
def test_a_400_about_the_key_or_the_account_fails_over(obj, verdict):
    assert classify_response(400, {}, body(obj), now=NOW) == verdict
    assert SECRET not in verdict.reason


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("obj,verdict", [(GEMINI_BAD_KEY, AUTH_400), (ANTHROPIC_NO_CREDIT, BILLING_400)],
                         ids=["gemini bad key", "anthropic no credit"])
def test_an_encoded_400_is_read_like_its_plain_twin(coding, obj, verdict):
    headers = {"Content-Type": "application/json", "Content-Encoding": coding}
    assert classify_response(400, headers, encoded(coding, body(obj)), now=NOW) == verdict


def test_a_gzip_400_without_a_header_is_still_read():
    assert classify_response(400, {}, gzip.compress(body(GEMINI_BAD_KEY)), now=NOW) == AUTH_400


OTHER_400S = [
    ("anthropic prompt too long", anthropic("invalid_request_error", "prompt is too long: 210000 tokens > 200000")),
    ("anthropic credit phrase in another type", anthropic("api_error", "credit balance is too low")),
    ("credit phrase without a type", {"error": {"message": "Your credit balance is too low"}}),
    ("openai bad param", openai("Unsupported parameter: 'temperature'", "invalid_request_error",
                                "unsupported_parameter")),
    ("gemini invalid argument", gemini(400, "INVALID_ARGUMENT", "Request contains an invalid argument.")),
    ("gemini other ErrorInfo", gemini(400, "FAILED_PRECONDITION", "User location is not supported", {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "LOCATION_NOT_SUPPORTED"})),
    ("auth type at 400", anthropic("authentication_error", "invalid x-api-key")),
    ("quota code at 400", openai("You exceeded your current quota", "insufficient_quota", "insufficient_quota")),
    ("overloaded at 400", anthropic("overloaded_error", "Overloaded")),
]


@pytest.mark.parametrize("obj", [row[1] for row in OTHER_400S], ids=[row[0] for row in OTHER_400S])
def test_every_other_400_is_returned_as_is(obj):
    assert classify_response(400, {"Retry-After": "9"}, body(obj), now=NOW) is RETURN


@pytest.mark.parametrize("payload", [b"", b"<html>Bad Request</html>", b"\x1f\x8b\x00garbage", body({"error": None})],
                         ids=["empty", "html", "corrupt gzip", "null error"])
def test_an_unreadable_400_is_returned_as_is(payload):
    assert classify_response(400, {"Content-Encoding": "gzip"}, payload, now=NOW) is RETURN
    assert classify_answer(400, {}, payload, None, now=NOW) is RETURN


def test_a_400_that_fails_over_carries_the_hint():
    assert classify_response(400, {"Retry-After": "30"}, body(GEMINI_BAD_KEY), now=NOW).cooldown == 30.0


# --------------------------------------------------------------------------- hints

HTTP_DATE_IN_2_MIN = formatdate(NOW + 120, usegmt=True)
HTTP_DATE_PAST = formatdate(NOW - 120, usegmt=True)

RETRY_AFTER_ROWS = [
    ("30", 30.0),
    ("0", 0.0),
    ("1.5", 1.5),
    (" 7 ", 7.0),
    (HTTP_DATE_IN_2_MIN, 120.0),
    (HTTP_DATE_IN_2_MIN.replace("GMT", "-0000"), 120.0),
    (HTTP_DATE_PAST, None),
    ("-5", None),
    ("soon", None),
    ("Fri, 99 Foo 2023 25:61:00 GMT", None),
    ("", None),
]


@pytest.mark.parametrize("value,expected", RETRY_AFTER_ROWS)
def test_retry_after(value, expected):
    assert retry_hint({"Retry-After": value}, None, now=NOW) == expected


DURATION_ROWS = [
    ("20ms", 0.02),
    ("1s", 1.0),
    ("2m", 120.0),
    ("1m30s", 90.0),
    ("6m0s", 360.0),
    ("0h2m3.5s", 123.5),
    ("0.5h1m", 1860.0),
    ("1h2m3.5s", MAX_COOLDOWN),  # 3723.5 s, capped
    ("1.5s", 1.5),
    ("1s500ms", 1.5),
    ("12.5", 12.5),
    ("7", 7.0),
    ("-1s", None),
    ("1x", None),
    ("ms", None),
    ("soon", None),
]


@pytest.mark.parametrize("header", ["X-RateLimit-Reset-Requests", "x-ratelimit-reset-tokens"])
@pytest.mark.parametrize("value,expected", DURATION_ROWS)
def test_ratelimit_reset_headers(header, value, expected):
    hint = retry_hint({header: value}, None, now=NOW)
    assert hint == pytest.approx(expected) if expected is not None else hint is None


@pytest.mark.parametrize("value,expected", [
    ("3000", 3.0), ("250", 0.25), ("1500.5", 1.5005), (" 20 ", 0.02), ("0", 0.0),
    ("-5", None), ("3s", None), ("soon", None), ("", None),
])
def test_retry_after_ms(value, expected):
    hint = retry_hint({"retry-after-ms": value}, None, now=NOW)
    assert hint == pytest.approx(expected) if expected is not None else hint is None


def test_retry_after_ms_takes_part_in_the_largest_of_rule_and_is_capped():
    assert retry_hint({"Retry-After": "2", "retry-after-ms": "3000"}, None, now=NOW) == 3.0
    assert retry_hint({"Retry-After": "5", "Retry-After-Ms": "3000"}, None, now=NOW) == 5.0
    assert retry_hint({"retry-after-ms": "999999999"}, None, now=NOW) == MAX_COOLDOWN
    assert classify_response(429, {"retry-after-ms": "3000"}, b"", now=NOW).cooldown == 3.0


@pytest.mark.parametrize(
    "delay,expected",
    [("37s", 37.0), ("1.5s", 1.5), ("0.25s", 0.25), ({"seconds": 4, "nanos": 500_000_000}, 4.5),
     ("37", None), ("soon", None), (None, None), (-3, None)],
)
def test_gemini_retry_delay(delay, expected):
    error_json = gemini(429, "RESOURCE_EXHAUSTED", "slow down", retry_info(delay))
    assert retry_hint({}, error_json, now=NOW) == expected


def test_retry_delay_needs_the_retry_info_type():
    error_json = gemini(429, "RESOURCE_EXHAUSTED", "x", {"@type": "type.googleapis.com/google.rpc.Help",
                                                          "retryDelay": "37s"})
    assert retry_hint({}, error_json, now=NOW) is None


def test_largest_hint_wins():
    headers = {
        "Retry-After": "10",
        "X-RateLimit-Reset-Requests": "1m",
        "X-RateLimit-Reset-Tokens": "20ms",
    }
    error_json = gemini(429, "RESOURCE_EXHAUSTED", "x", retry_info("37s"))
    assert retry_hint(headers, error_json, now=NOW) == 60.0
    assert retry_hint({**headers, "X-RateLimit-Reset-Requests": "garbage"}, error_json, now=NOW) == 37.0


@pytest.mark.parametrize(
    "headers,error_json",
    [
        ({"Retry-After": "999999"}, None),
        ({"X-RateLimit-Reset-Requests": "2h"}, None),
        ({"Retry-After": formatdate(NOW + 86_400, usegmt=True)}, None),
        ({}, gemini(429, "RESOURCE_EXHAUSTED", "x", retry_info("86400s"))),
    ],
    ids=["seconds", "duration", "date", "retryDelay"],
)
def test_hint_is_capped(headers, error_json):
    assert retry_hint(headers, error_json, now=NOW) == MAX_COOLDOWN == 3600.0


def test_no_hint():
    assert retry_hint({}, None, now=NOW) is None
    assert retry_hint({"Content-Type": "application/json"}, {"error": {"message": "x"}}, now=NOW) is None


@pytest.mark.parametrize(
    "headers",
    [
        CaseInsensitiveDict({"retry-after": "5"}),
        CaseInsensitiveDict({"RETRY-AFTER": "5"}),
        {"rEtRy-AfTeR": "5"},
    ],
    ids=["requests lower", "requests upper", "plain dict mixed case"],
)
def test_header_names_are_case_insensitive(headers):
    assert classify_response(429, headers, b"", now=NOW).cooldown == 5.0


def test_gzip_gemini_429_uses_retry_info():
    payload = gzip.compress(body(gemini(429, "RESOURCE_EXHAUSTED", GEMINI_QUOTA_MESSAGE,
                                        quota_failure("GenerateRequestsPerMinutePerProjectPerModel-FreeTier"),
                                        retry_info("37s"))))
    verdict = classify_response(429, {"Content-Encoding": "gzip"}, payload, now=NOW)
    assert verdict == Verdict(True, Kind.RATE_LIMIT, False, 37.0, "rate limited (429)")


def test_server_error_body_hint_counts():
    payload = body(gemini(503, "UNAVAILABLE", "The model is overloaded.", retry_info("12s")))
    assert classify_response(503, {}, payload, now=NOW).cooldown == 12.0


# --------------------------------------------------------------------------- SSE


def sse(data: object, event: str | None = None, newline: str = "\n") -> bytes:
    lines = [f"event: {event}"] if event else []
    lines.append("data: " + (data if isinstance(data, str) else json.dumps(data)))
    return (newline.join(lines) + newline + newline).encode()


SSE_FAILOVER_ROWS = [
    # Anthropic
    ("anthropic overloaded", sse(anthropic("overloaded_error", "Overloaded"), "error"), Kind.OVERLOADED,
     "SSE error event: overloaded (529)"),
    ("anthropic rate limit", sse(anthropic("rate_limit_error"), "error"), Kind.RATE_LIMIT,
     "SSE error event: rate limited (429)"),
    ("anthropic api error", sse(anthropic("api_error"), "error"), Kind.SERVER_ERROR,
     "SSE error event: server error (500)"),
    ("anthropic timeout", sse(anthropic("timeout_error"), "error"), Kind.SERVER_ERROR,
     "SSE error event: server error (504)"),
    ("anthropic auth", sse(anthropic("authentication_error"), "error"), Kind.AUTH, "SSE error event: auth error (401)"),
    ("anthropic permission", sse(anthropic("permission_error"), "error"), Kind.AUTH,
     "SSE error event: auth error (403)"),
    ("anthropic billing", sse(anthropic("billing_error"), "error"), Kind.BILLING,
     "SSE error event: billing error (402)"),
    ("anthropic no event line", sse(anthropic("overloaded_error")), Kind.OVERLOADED,
     "SSE error event: overloaded (529)"),
    ("anthropic crlf", sse(anthropic("overloaded_error"), "error", "\r\n"), Kind.OVERLOADED,
     "SSE error event: overloaded (529)"),
    # OpenAI Responses
    ("responses rate limit", sse({"type": "error", "code": "rate_limit_exceeded", "message": OPENAI_TPM_MESSAGE,
                                  "param": None, "sequence_number": 0}, "error"), Kind.RATE_LIMIT,
     "SSE error event: rate limited (429)"),
    ("responses quota", sse({"type": "error", "code": "insufficient_quota", "message": GEMINI_QUOTA_MESSAGE,
                             "param": None, "sequence_number": 0}, "error"), Kind.QUOTA,
     "SSE error event: quota exhausted (429): insufficient_quota"),
    ("responses server error", sse({"type": "error", "code": "server_error", "message": "x",
                                    "sequence_number": 0}, "error"), Kind.SERVER_ERROR,
     "SSE error event: server error (500)"),
    ("responses failed", sse({"type": "response.failed", "sequence_number": 1, "response": {
        "id": "resp_1", "status": "failed", "error": {"code": "server_error", "message": "x"}}},
        "response.failed"), Kind.SERVER_ERROR, "SSE error event: server error (500)"),
    ("responses failed rate limit", sse({"type": "response.failed", "response": {
        "error": {"code": "rate_limit_exceeded", "message": "x"}}}, "response.failed"), Kind.RATE_LIMIT,
     "SSE error event: rate limited (429)"),
    # OpenAI chat completions
    ("chat quota", sse(openai(GEMINI_QUOTA_MESSAGE, "insufficient_quota", "insufficient_quota")), Kind.QUOTA,
     "SSE error event: quota exhausted (429): insufficient_quota"),
    ("chat invalid key", sse(openai(f"Incorrect API key provided: {SECRET}", "invalid_request_error",
                                    "invalid_api_key")), Kind.AUTH, "SSE error event: auth error (401)"),
    ("chat server error", sse(openai("The server had an error", "server_error", None)), Kind.SERVER_ERROR,
     "SSE error event: server error (500)"),
    ("chat rate limit", sse(openai(OPENAI_TPM_MESSAGE, "tokens", "rate_limit_exceeded")), Kind.RATE_LIMIT,
     "SSE error event: rate limited (429)"),
    # Gemini
    ("gemini per-minute", sse(gemini(429, "RESOURCE_EXHAUSTED", GEMINI_QUOTA_MESSAGE,
                                     quota_failure("GenerateRequestsPerMinutePerProjectPerModel-FreeTier"))),
     Kind.RATE_LIMIT, "SSE error event: rate limited (429)"),
    ("gemini per-day", sse(gemini(429, "RESOURCE_EXHAUSTED", GEMINI_QUOTA_MESSAGE,
                                  quota_failure("GenerateRequestsPerDayPerProjectPerModel-FreeTier"))),
     Kind.QUOTA, "SSE error event: quota exhausted (429): per-day quota"),
    ("gemini unavailable", sse(gemini(503, "UNAVAILABLE", "The model is overloaded.")), Kind.SERVER_ERROR,
     "SSE error event: server error (503)"),
    ("gemini status only", sse({"error": {"message": "internal", "status": "INTERNAL"}}), Kind.SERVER_ERROR,
     "SSE error event: server error (500)"),
    ("gemini bad key", sse(GEMINI_BAD_KEY), Kind.AUTH, "SSE error event: auth error (400): api_key_invalid"),
    # The 400 rows hold in a stream too
    ("anthropic no credit", sse(ANTHROPIC_NO_CREDIT, "error"), Kind.BILLING,
     "SSE error event: billing error (400): credit balance is too low"),
]


@pytest.mark.parametrize("event,kind,reason", [r[1:] for r in SSE_FAILOVER_ROWS], ids=[r[0] for r in SSE_FAILOVER_ROWS])
def test_sse_error_event_fails_over(event, kind, reason):
    verdict = classify_sse_error(event, now=NOW)
    assert verdict == Verdict(True, kind, kind in (Kind.AUTH, Kind.BILLING, Kind.QUOTA), None, reason)


def test_sse_gemini_retry_info_is_the_cooldown():
    event = sse(gemini(429, "RESOURCE_EXHAUSTED", "x", retry_info("37s")))
    assert classify_sse_error(event, now=NOW).cooldown == 37.0


SSE_NONE_ROWS = [
    ("anthropic message_start", sse({"type": "message_start", "message": {"id": "msg_1", "type": "message",
                                                                          "role": "assistant", "content": []}},
                                    "message_start")),
    ("anthropic ping", sse({"type": "ping"}, "ping")),
    ("responses created", sse({"type": "response.created", "sequence_number": 0, "response": {
        "id": "resp_1", "status": "in_progress", "error": None}}, "response.created")),
    ("gemini chunk", sse({"candidates": [{"content": {"parts": [{"text": "Hi"}], "role": "model"}}],
                          "modelVersion": "gemini-2.5-flash"})),
    ("chat chunk", sse({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": {"content": "Hi"}}]})),
    ("chat chunk error null", sse({"id": "c", "choices": [], "error": None})),
    ("done", sse("[DONE]")),
    ("comment only", b": keep-alive\n\n"),
    ("empty", b""),
    ("garbage", b"\x00\xff\n\n"),
    # Errors whose implied status is returned as is
    ("anthropic invalid request", sse(anthropic("invalid_request_error", "prompt is too long"), "error")),
    ("anthropic too large", sse(anthropic("request_too_large"), "error")),
    ("anthropic not found", sse(anthropic("not_found_error"), "error")),
    ("responses context length", sse({"type": "error", "code": "context_length_exceeded", "message": "x"}, "error")),
    ("responses failed invalid prompt", sse({"type": "response.failed", "response": {
        "error": {"code": "invalid_prompt", "message": "x"}}}, "response.failed")),
    ("responses failed without error", sse({"type": "response.failed", "response": {"error": None}},
                                           "response.failed")),
    ("chat invalid request", sse(openai("maximum context length", "invalid_request_error",
                                        "context_length_exceeded"))),
    ("gemini invalid argument", sse(gemini(400, "INVALID_ARGUMENT", "bad"))),
    ("error event unknown type", sse(anthropic("mystery_error"), "error")),
    ("error event not json", b"event: error\ndata: oops\n\n"),
    # Only the first event counts
    ("error in second event", sse({"type": "message_start"}, "message_start")
     + sse(anthropic("overloaded_error"), "error")),
    ("error after a data-less event", b"event: ping\n\n" + sse(anthropic("overloaded_error"), "error")),
]


@pytest.mark.parametrize("event", [r[1] for r in SSE_NONE_ROWS], ids=[r[0] for r in SSE_NONE_ROWS])
def test_sse_non_failover_event(event):
    assert classify_sse_error(event, now=NOW) is None


@pytest.mark.parametrize(
    "event",
    [
        b"\xef\xbb\xbfevent: error\ndata: " + body(anthropic("overloaded_error")) + b"\n\n",  # BOM
        b"event:error\ndata:" + body(anthropic("overloaded_error")) + b"\n\n",  # no space after colon
        b"event: error\r"
        b"data: " + body(anthropic("overloaded_error")) + b"\r\r",  # bare CR line endings
        b": comment\nevent: error\ndata: {\"type\": \"error\",\ndata: \"error\": {\"type\": \"overloaded_error\"}}\n\n",
    ],
    ids=["bom", "no space", "cr", "multi-line data"],
)
def test_sse_framing_variants(event):
    assert classify_sse_error(event, now=NOW).kind is Kind.OVERLOADED


# --------------------------------------------------------------------------- scope

#: Every kind: (key_scoped, counts_for_breaker).
SCOPES = {
    Kind.AUTH: (True, False),
    Kind.BILLING: (True, False),
    Kind.QUOTA: (True, False),
    Kind.RATE_LIMIT: (True, False),
    Kind.OVERLOADED: (False, True),
    Kind.SERVER_ERROR: (False, True),
    Kind.TIMEOUT: (False, True),
    Kind.INCOMPLETE: (False, True),
}


def test_every_kind_has_a_scope():
    assert set(SCOPES) == set(Kind)


@pytest.mark.parametrize("kind", list(Kind), ids=lambda kind: kind.value)
def test_scope_of_each_kind(kind):
    assert (kind.key_scoped, kind.counts_for_breaker) == SCOPES[kind]


@pytest.mark.parametrize("status, obj, key_scoped", [
    (401, None, True), (403, None, True), (402, None, True),
    (429, None, True),  # a plain rate limit: the key's, another key may have room
    (429, openai("You exceeded your current quota", "insufficient_quota", "insufficient_quota"), True),
    (429, anthropic("authentication_error"), True),
    (400, GEMINI_BAD_KEY, True), (400, ANTHROPIC_NO_CREDIT, True),
    (408, None, False), (500, None, False), (502, None, False), (503, None, False), (504, None, False),
    (529, None, False), (520, None, False), (521, None, False), (522, None, False), (523, None, False),
    (524, None, False), (500, anthropic("overloaded_error"), False),
])
def test_scope_of_each_failing_status(status, obj, key_scoped):
    verdict = classify_response(status, {}, body(obj) if obj else b"", now=NOW)
    assert verdict.failover
    assert (verdict.key_scoped, verdict.counts_for_breaker) == (key_scoped, not key_scoped)


@pytest.mark.parametrize("event, key_scoped", [
    (sse(anthropic("overloaded_error", "Overloaded"), "error"), False),
    (sse(anthropic("api_error"), "error"), False),
    (sse(gemini(503, "UNAVAILABLE", "The model is overloaded.")), False),
    (sse(anthropic("authentication_error"), "error"), True),
    (sse(anthropic("rate_limit_error"), "error"), True),
    (sse(ANTHROPIC_NO_CREDIT, "error"), True),
    (sse(GEMINI_BAD_KEY), True),
], ids=["overloaded", "api error", "gemini unavailable", "authentication", "rate limit", "no credit", "gemini key"])
def test_an_sse_error_takes_the_scope_of_the_status_it_implies(event, key_scoped):
    verdict = classify_sse_error(event, now=NOW)
    assert (verdict.key_scoped, verdict.counts_for_breaker) == (key_scoped, not key_scoped)


@pytest.mark.parametrize("kind", [Kind.SERVER_ERROR, Kind.TIMEOUT, Kind.INCOMPLETE])
def test_failures_clipal_saw_itself_are_the_providers(kind):
    verdict = provider_failure("stream ended before its last event", kind)
    assert verdict.failover and not verdict.key_scoped and verdict.counts_for_breaker


def test_a_returned_answer_has_no_scope():
    assert not RETURN.key_scoped and not RETURN.counts_for_breaker
