"""Client credentials seen at runtime: masked from the moment they are added, bounded, O(1) to add.

Each proxied request may carry a credential clipal has never seen (an agent
with a fresh token, or a client trying random ones). Remembering it must not
cost more as more are seen, and the set must stay bounded, while a
credential added before a line is written is masked in that line.
"""

from __future__ import annotations

import json
import secrets
import time
from urllib.parse import quote

import pytest

from clipal.redact import Redactor


def token() -> str:
    return "tok_" + secrets.token_hex(16)


def test_a_secret_is_masked_in_the_first_line_after_it_was_added():
    redactor = Redactor()
    for _ in range(300):
        fresh = token()
        redactor.add(fresh)
        assert fresh not in redactor.redact(f"upstream echoed {fresh} back")


@pytest.mark.parametrize("template", [
    "x{s}y", "/path/{s}/more", "key:{s},", "{s}{s}", "…{s}…", "Bearer\t{s}\n", "[{s}]",
])
def test_a_secret_is_masked_wherever_it_sits_in_the_line(template):
    secret = "plainclientsecret0123456789"
    redactor = Redactor()
    redactor.add(secret)
    text = redactor.redact(template.format(s=secret))
    assert secret[:8] not in text and secret[-8:] not in text


@pytest.mark.parametrize("secret", [
    'has "quotes" and \\ backslash', "has spaces inside it", "ünïcödé-sëcrët-välue", "a:b=c&d;e,f(g)",
])
def test_a_secret_with_any_characters_is_masked_raw_json_escaped_and_url_encoded(secret):
    redactor = Redactor()
    redactor.add(secret)
    for form in (secret, json.dumps(secret)[1:-1], quote(secret, safe="")):
        assert form not in redactor.redact(f"echo <{form}> end"), form


def test_old_secrets_are_evicted_and_the_newest_kept():
    redactor = Redactor(runtime_limit=50)
    seen = [token() for _ in range(200)]
    for secret in seen:
        redactor.add(secret)
    assert all(redactor.redact(secret) == secret for secret in seen[:150])  # forgotten
    assert all(secret not in redactor.redact(secret) for secret in seen[150:])
    redactor.add(seen[150])  # seen again: the newest now
    for _ in range(49):
        redactor.add(token())
    assert seen[150] not in redactor.redact(seen[150])
    assert redactor.redact(seen[151]) == seen[151]


def test_forgetting_a_credential_keeps_a_spelling_another_one_shares():
    redactor = Redactor(runtime_limit=2)
    redactor.add("shared/part-0123456789")  # URL-encoded: shared%2Fpart-0123456789
    redactor.add("shared%2Fpart-0123456789")  # raw: the same text
    redactor.add("third-secret-0123456789")  # the first one is forgotten
    assert redactor.redact("shared/part-0123456789") == "shared/part-0123456789"
    assert "2Fpart" not in redactor.redact("shared%2Fpart-0123456789")


def test_credentials_with_whitespace_are_bounded_apart():
    redactor = Redactor()
    spaced = [f"spaced {i:04d} credential" for i in range(100)]
    for secret in spaced:
        redactor.add(secret)
    redactor.add("tokenlike-0123456789")
    assert spaced[-1] not in redactor.redact(spaced[-1])  # the newest are masked ...
    assert redactor.redact(spaced[0]) == spaced[0]  # ... and only a few of them are looked for one by one
    assert "%20" not in redactor.redact(quote(spaced[0], safe=""))  # their spelling without spaces still is
    assert "0123456789" not in redactor.redact("tokenlike-0123456789")


def test_the_characters_held_are_bounded_too():
    redactor = Redactor(runtime_limit=256, runtime_chars=100_000)
    for _ in range(256):
        redactor.add("t" + secrets.token_hex(2000))  # 4 KB credentials, three spellings each
    assert redactor.runtime_chars() <= 100_000


def test_overlapping_secrets_leave_nothing_of_either():
    redactor = Redactor()
    redactor.set_known(["providerkey-AAAA-BBBB"])
    redactor.add("BBBB-clientpart-CCCC")
    text = redactor.redact("providerkey-AAAA-BBBB-clientpart-CCCC tail")
    assert "clientpart" not in text and "AAAA" not in text and "CCCC" not in text
    assert text.endswith(" tail")


def test_adding_costs_the_same_however_many_were_added_before():
    # Each add rebuilt one regex of every known credential: ~15 ms each at
    # the 256 bound, so 1000 fresh tokens took seconds.
    redactor = Redactor()
    redactor.set_known(f"provider-key-{i:03d}-abcdefghijkl" for i in range(20))
    line = "[INFO]  2024-01-01 12:00:00 [codex] request completed via openrouter (200, 1234 bytes in 0.52s)"
    fresh = [token() for _ in range(1000)]
    start = time.perf_counter()
    for secret in fresh:
        redactor.add(secret)
        redactor.redact(line)
    per_request = (time.perf_counter() - start) / len(fresh)
    assert per_request < 200e-6, f"{per_request * 1e6:.0f} us per add + line"


def test_provider_keys_prepared_ahead_are_used_only_for_the_same_keys():
    redactor = Redactor()
    redactor.prepare_known(["prepared-provider-key-0001 "])
    redactor.set_known(["other-provider-key-0002"])  # not what was prepared: compiled on the spot
    assert redactor.redact("other-provider-key-0002") == "othe...[redacted]"
    assert redactor.redact("prepared-provider-key-0001") == "prepared-provider-key-0001"
    redactor.prepare_known(["prepared-provider-key-0001"])
    redactor.set_known(["prepared-provider-key-0001"])
    assert redactor.redact("prepared-provider-key-0001 other-provider-key-0002") == (
        "prep...[redacted] other-provider-key-0002")
