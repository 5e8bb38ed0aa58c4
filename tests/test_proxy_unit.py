"""The one duration formatter, used by every log line and message."""

import pytest

from clipal.config import format_duration


@pytest.mark.parametrize("seconds,text", [
    (0, "0s"), (0.3, "300ms"), (0.9996, "1s"), (1, "1s"), (45, "45s"),
    (150, "2m30s"), (3600, "1h"), (5400, "1h30m"), (3661, "1h1m1s"), (3601, "1h0m1s"),
])
def test_durations_in_log_lines_read_like_the_config(seconds, text):
    # A sub-second reactivate_after must not be logged as "deactivated for 0s".
    assert format_duration(seconds) == text


def test_only_claude_codes_count_tokens_path_is_a_count_tokens_request():
    from clipal.clients import CLAUDE_CODE, CODEX, GEMINI

    assert CLAUDE_CODE.is_count_tokens("/v1/messages/count_tokens")
    assert CLAUDE_CODE.is_count_tokens("/api/v1/messages/count_tokens/")
    assert not CLAUDE_CODE.is_count_tokens("/v1/messages")
    assert not CODEX.is_count_tokens("/v1/messages/count_tokens")
    assert not GEMINI.is_count_tokens("/v1beta/models/m:countTokens")
