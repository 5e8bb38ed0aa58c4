"""The README, followed as a newcomer would (issue 5, acceptance 4; issue 2, acceptances 1, 7).

Each agent's configuration snippet is read out of README.md's code blocks, its port swapped
for the test clipal's, and the official SDK of that protocol is configured exactly that
way: the Anthropic SDK from the two environment variables of Claude Code's settings.json,
the OpenAI SDK (Responses API) from the base_url of Codex's config.toml, google-genai from
the variables of Gemini CLI's .env. The answers must come back from the provider, with the
provider's key. The set-up commands must be one line each, the test one exactly what
.ci/run runs, and the install-and-run one must start clipal from a fresh venv.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import requests

from conftest import free_port, provider, write_config

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
README_ZH = REPO / "README.zh-CN.md"
CI_RUN = REPO / ".ci" / "run"

RUN_COMMAND = "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/clipal"
TEST_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/pytest -q"

# The agent's own key as the README writes it; clipal must replace it with the provider's.
ANTHROPIC_KEY = "sk-ant-api03-readme-provider-key-0123456789"
OPENAI_KEY = "sk-proj-readme-provider-key-0123456789"
GEMINI_KEY = "AIzaSy-readme-provider-key-0123456789"


def code_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, indented ones (in lists) included."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)\n(?P<body>.*?)\n(?P=indent)```",
                             text, re.M | re.S):
        indent = match["indent"]
        body = "\n".join(line[len(indent):] if line.startswith(indent) else line
                         for line in match["body"].split("\n"))
        blocks.append((match["lang"], body))
    return blocks


def the_block(path: Path, lang: str, marker: str) -> str:
    """The one code block of ``lang`` that contains ``marker``."""
    found = [body for block_lang, body in code_blocks(path) if block_lang == lang and marker in body]
    assert len(found) == 1, f"{path.name}: expected one ```{lang} block with {marker!r}, found {len(found)}"
    return found[0]


def section(path: Path, title: str) -> str:
    text = path.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{path.name} has no section {title!r}"
    return match.group(1)


def on_port(url: str, port: int) -> str:
    assert "127.0.0.1:3333" in url, url
    return url.replace("127.0.0.1:3333", f"127.0.0.1:{port}")


# --------------------------------------------------------------------------- set-up commands


def setup_commands(path: Path, title: str) -> list[str]:
    blocks = [body for lang, body in code_blocks_of(section(path, title)) if lang == "bash"]
    assert all("\n" not in body.strip() for body in blocks), "each set-up command is one line"
    return [body.strip() for body in blocks]


def code_blocks_of(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```([\w-]*)\n(.*?)\n```", text, re.M | re.S)]


def test_the_two_setup_commands_are_one_line_each_and_ci_runs_the_test_one():
    assert setup_commands(README, "Set-up commands") == [RUN_COMMAND, TEST_COMMAND]
    assert setup_commands(README_ZH, "设置命令") == [RUN_COMMAND, TEST_COMMAND]
    script = CI_RUN.read_text()
    assert os.access(CI_RUN, os.X_OK), ".ci/run must be executable"
    assert script.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in script
    commands = [line.strip() for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert any(line == TEST_COMMAND or line.startswith(TEST_COMMAND + " ||") for line in commands), \
        ".ci/run must run the README's test command verbatim"


def test_both_readmes_carry_the_same_commands_and_agent_snippets():
    """README.zh-CN.md is kept in step: every command and snippet a user copies is identical."""
    def copied(path: Path) -> list[tuple[str, str]]:
        return [(lang, body) for lang, body in code_blocks(path) if lang in ("bash", "json", "toml", "yaml")
                and "#" not in body]  # blocks with comments are translated

    english, chinese = copied(README), copied(README_ZH)
    assert english == chinese
    for lang, marker in (("json", "ANTHROPIC_BASE_URL"), ("toml", "model_providers"),
                         ("bash", "GOOGLE_GEMINI_BASE_URL")):
        assert the_block(README, lang, marker) == the_block(README_ZH, lang, marker)


def test_readme_install_and_run_command_starts_clipal_in_a_fresh_venv(tmp_path, upstream_factory):
    """The first set-up command, verbatim, in a copy of the checkout (slow: ~10 s, a real pip
    install from the package index, which .ci/run has just used too)."""
    python3 = shutil.which("python3")
    if python3 is None or subprocess.run([python3, "-c", "import sys; sys.exit(sys.version_info < (3, 11))"]).returncode:
        pytest.skip("needs python3 >= 3.11 on PATH, as the README says")
    source = tmp_path / "clipal-checkout"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "out"))
    a = upstream_factory("A")
    config_dir = tmp_path / "dot-clipal"
    port = free_port()
    write_config(config_dir, settings={"port": port}, codex=[provider("A", a)])
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(CLIPAL_CONFIG_DIR=str(config_dir), PIP_DISABLE_PIP_VERSION_CHECK="1")
    log = open(tmp_path / "setup.out", "wb")
    process = subprocess.Popen(["bash", "-c", RUN_COMMAND], cwd=source, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, (tmp_path / "setup.out").read_text(errors="replace")
            try:
                health = requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "clipal did not start within 300 s"
                time.sleep(0.2)
        assert health.json() == {"status": "healthy"}
        answer = requests.post(f"http://127.0.0.1:{port}/codex/v1/chat/completions",
                               json={"model": "m", "messages": []}, timeout=10)
        assert answer.status_code == 200 and answer.headers["X-Clipal-Provider"] == "A"
        assert (source / ".venv" / "bin" / "clipal").exists()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # bash and the clipal it started
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


# --------------------------------------------------------------------------- agents


@pytest.fixture
def clean_agent_env(monkeypatch):
    """No credentials or base URLs from the machine running the tests."""
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "OPENAI_API_KEY",
                 "OPENAI_BASE_URL", "GOOGLE_API_KEY", "GEMINI_API_KEY", "GOOGLE_GEMINI_BASE_URL",
                 "GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def assert_only_provider_key(request, header: str, key: str, client_value: str) -> None:
    """The upstream saw the provider key on ``header`` and nothing of the agent's own key."""
    assert request.headers[header] == (f"Bearer {key}" if header == "Authorization" else key)
    for name, value in request.headers.items():
        assert client_value not in value, f"the agent's key reached the provider in {name}"
    assert client_value not in request.query_string


def test_claude_code_settings_json_as_written(clipal, upstream_factory, clean_agent_env):
    anthropic = pytest.importorskip("anthropic")
    settings = json.loads(the_block(README, "json", "ANTHROPIC_BASE_URL"))
    env = settings["env"]
    assert set(env) == {"ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN"}
    a = upstream_factory("A")
    proxy = clipal(claudecode=[provider("anthropic", a, key=ANTHROPIC_KEY)])
    clean_agent_env.setenv("ANTHROPIC_BASE_URL", on_port(env["ANTHROPIC_BASE_URL"], proxy.port))
    clean_agent_env.setenv("ANTHROPIC_AUTH_TOKEN", env["ANTHROPIC_AUTH_TOKEN"])

    client = anthropic.Anthropic(max_retries=0)  # configured by those two variables only
    message = client.messages.create(model="claude-test-model", max_tokens=64,
                                     messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == "hello from A"
    with client.messages.stream(model="claude-test-model", max_tokens=64,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        assert "".join(stream.text_stream) == "hello from A"
    first, second = a.wait_for_requests(2)
    assert first.path == second.path == "/v1/messages"
    for request in (first, second):
        # sk-ant-api keys go in x-api-key even though Claude Code sent a Bearer token.
        assert_only_provider_key(request, "x-api-key", ANTHROPIC_KEY, env["ANTHROPIC_AUTH_TOKEN"])
        assert request.headers["Authorization"] is None


def test_codex_config_toml_as_written(clipal, upstream_factory, clean_agent_env):
    openai = pytest.importorskip("openai")
    config = tomllib.loads(the_block(README, "toml", "model_providers"))
    entry = config["model_providers"][config["model_provider"]]
    assert entry["wire_api"] == "responses"
    assert "env_key" not in entry, "the README says no env_key is needed"
    a = upstream_factory("A")
    proxy = clipal(codex=[provider("openai", a, key=OPENAI_KEY)])
    base_url = on_port(entry["base_url"], proxy.port)

    # What Codex sends: POST <base_url>/responses, streaming, and no credential at all.
    raw = requests.post(base_url + "/responses", json={"model": "gpt-5-codex", "input": "hi", "stream": True},
                        timeout=10)
    assert raw.status_code == 200 and "event: response.completed" in raw.text
    request = a.wait_for_requests(1)[0]
    assert request.path == "/v1/responses"
    assert request.headers["Authorization"] == f"Bearer {OPENAI_KEY}"

    # The OpenAI SDK with the same base_url, Responses API, streaming and not.
    client = openai.OpenAI(base_url=base_url, api_key="codex-key", max_retries=0)
    assert client.responses.create(model="gpt-5-codex", input="hi").output_text == "hello from A"
    with client.responses.stream(model="gpt-5-codex", input="hi") as stream:
        assert stream.get_final_response().output_text == "hello from A"
    for request in a.wait_for_requests(3)[1:]:
        assert request.path == "/v1/responses"
        assert_only_provider_key(request, "Authorization", OPENAI_KEY, "codex-key")


def dotenv(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.removeprefix("export ").partition("=")
            values[name.strip()] = value.strip().strip("'\"")
    return values


def test_gemini_cli_env_as_written(clipal, upstream_factory, clean_agent_env):
    genai = pytest.importorskip("google.genai")
    env = dotenv(the_block(README, "bash", "GOOGLE_GEMINI_BASE_URL"))
    assert set(env) == {"GOOGLE_GEMINI_BASE_URL", "GEMINI_API_KEY"}
    a = upstream_factory("A")
    proxy = clipal(gemini=[provider("google", a, key=GEMINI_KEY)])
    clean_agent_env.setenv("GOOGLE_GEMINI_BASE_URL", on_port(env["GOOGLE_GEMINI_BASE_URL"], proxy.port))
    clean_agent_env.setenv("GEMINI_API_KEY", env["GEMINI_API_KEY"])

    client = genai.Client()  # configured by those two variables only
    assert client.models.generate_content(model="gemini-2.5-pro", contents="hi").text == "hello from A"
    streamed = "".join(chunk.text or "" for chunk in
                       client.models.generate_content_stream(model="gemini-2.5-pro", contents="hi"))
    assert streamed == "hello from A"
    plain, stream = a.wait_for_requests(2)
    assert plain.path.endswith("/models/gemini-2.5-pro:generateContent")
    assert stream.path.endswith("/models/gemini-2.5-pro:streamGenerateContent")
    for request in (plain, stream):
        assert_only_provider_key(request, "x-goog-api-key", GEMINI_KEY, env["GEMINI_API_KEY"])
