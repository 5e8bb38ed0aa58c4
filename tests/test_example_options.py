"""The options the example files show only in comments must load once uncommented as written.

tests/test_examples.py loads the files as they are; a commented example is not loaded
there, so a typo in one would reach a user's file unnoticed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from clipal.config import load_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _copy(tmp_path: Path) -> Path:
    for path in EXAMPLES.glob("*.yaml"):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


def test_the_commented_api_keys_example_replaces_api_key(tmp_path):
    text = (EXAMPLES / "claude-code.yaml").read_text()
    commented = re.findall(r"^  #   (api_keys:|  - .*)$", text, flags=re.MULTILINE)
    assert commented[0] == "api_keys:" and len(commented) >= 3, commented
    keys = "".join(f"    {line}\n" for line in commented)
    first_key = re.search(r'^    api_key: "sk-ant-api03-REPLACE_ME"\n', text, flags=re.MULTILINE)
    assert first_key, "the anthropic provider's api_key line"
    (_copy(tmp_path) / "claude-code.yaml").write_text(text[:first_key.start()] + keys + text[first_key.end():])

    anthropic = load_config(tmp_path).providers["claudecode"][0]
    assert anthropic.name == "anthropic"
    assert anthropic.api_keys == ("sk-ant-api03-FIRST-REPLACE_ME", "sk-ant-api03-SECOND-REPLACE_ME")


def test_the_commented_manual_mode_example_pins_a_provider(tmp_path):
    text = (EXAMPLES / "codex.yaml").read_text()
    commented = re.findall(r"^#   ((?:mode|pinned_provider): \S.*)$", text, flags=re.MULTILINE)
    assert [line.split(":")[0] for line in commented] == ["mode", "pinned_provider"]
    (_copy(tmp_path) / "codex.yaml").write_text("".join(f"{line}\n" for line in commented) + text)

    config = load_config(tmp_path)
    assert dict(config.pinned) == {"codex": "openrouter"}
    assert config.mode("codex") == "manual" and config.mode("claudecode") == "auto"
