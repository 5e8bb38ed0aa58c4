"""Config files over 1 MiB are refused; api keys are trimmed, and one with whitespace or controls inside is an error.

A key pasted with its line break used to be accepted and then fail every
request (the HTTP library refuses the header); a 10 MB file used to be parsed
for seconds. Neither message may show the key.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from clipal.config import MAX_CONFIG_BYTES, ConfigError, load_config

KEY = "sk-test-pasted-0123456789abcdef"


def write_provider(config_dir: Path, api_key: str, file: str = "codex.yaml") -> None:
    config_dir.mkdir(parents=True, exist_ok=True)
    document = {"providers": [{"name": "A", "base_url": "https://a.example", "api_key": api_key}]}
    (config_dir / file).write_text(yaml.safe_dump(document))


@pytest.mark.parametrize("pasted", [KEY + "\n", KEY + "\r\n", "  " + KEY + "\t", "\n" + KEY + " \n"])
def test_a_key_is_trimmed_of_surrounding_whitespace(tmp_path, pasted):
    write_provider(tmp_path, pasted)
    assert load_config(tmp_path).providers["codex"][0].api_key == KEY


@pytest.mark.parametrize("bad,what", [
    ("sk-test-pasted 0123456789abcdef", "whitespace"),
    ("sk-test-pasted\t0123456789abcdef", "whitespace"),
    ("sk-test-pasted\n0123456789abcdef", "whitespace"),
    ("sk-test-pasted\x070123456789abcdef", "control or invisible character"),
    ("sk-test-pasted\x7f0123456789abcdef", "control or invisible character"),
    ("sk-test-pasted\u200b0123456789abcdef", "control or invisible character"),
    ("sk-test-pasted\u00a00123456789abcdef", "whitespace"),
    ("sk-test-pasted\u20140123456789abcdef", "non-ASCII character"),
])
def test_a_key_with_whitespace_or_controls_inside_is_a_one_line_error_that_hides_it(tmp_path, bad, what):
    write_provider(tmp_path, bad)
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    message = str(caught.value)
    assert message.startswith('codex.yaml: provider "A": api_key ') and what in message
    assert "\n" not in message and "\r" not in message
    assert "pasted" not in message and "0123456789" not in message and "sk-t" not in message


def test_a_file_over_1_mib_is_refused_without_being_parsed(tmp_path):
    tmp_path.joinpath("codex.yaml").write_text("# " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match=r"^codex\.yaml: is larger than 1 MiB \(\d+ bytes\)"):
        load_config(tmp_path)


def test_a_file_of_exactly_1_mib_is_read(tmp_path):
    head = "log_level: debug\n# "
    tmp_path.joinpath("config.yaml").write_text(head + "x" * (MAX_CONFIG_BYTES - len(head) - 1) + "\n")
    assert tmp_path.joinpath("config.yaml").stat().st_size == MAX_CONFIG_BYTES
    assert load_config(tmp_path).settings.log_level == "debug"
