"""The files in examples/ are what a newcomer copies to ~/.clipal: they must load as they
are, say what the defaults are, and send each key where their comments say."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import requests
import yaml

from clipal.clients import CLAUDE_CODE, CODEX, GEMINI
from clipal.config import Settings, active_providers, load_config
from clipal.outbound import build_upstream_request

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_every_example_loads_without_errors():
    config = load_config(EXAMPLES)
    assert set(config.providers) == {"claudecode", "codex", "gemini"}
    assert all(config.providers.values()), "every client file has providers"


def test_config_yaml_spells_out_every_setting_with_its_default():
    document = yaml.safe_load((EXAMPLES / "config.yaml").read_text())
    keys = [field.name for field in dataclasses.fields(Settings)]
    assert list(document) == keys, "one entry per setting, in SPEC order"
    # The values written are the defaults: copying the file changes nothing.
    assert load_config(EXAMPLES).settings == Settings()
    text = (EXAMPLES / "config.yaml").read_text()
    for key in keys:
        # each key has a comment just above it explaining it
        assert re.search(rf"#[^\n]*\n{key}:", text), f"{key} has no comment above it"


def test_claude_code_example_providers_and_key_placement():
    config = load_config(EXAMPLES)
    providers = config.providers["claudecode"]
    assert [(p.name, p.priority, p.enabled) for p in providers] == [
        ("anthropic", 1, True), ("openrouter", 2, True), ("backup-relay", 3, False)]
    assert [p.name for p in active_providers(providers)] == ["anthropic", "openrouter"]
    anthropic, openrouter, _ = providers
    assert anthropic.base_url == "https://api.anthropic.com" and anthropic.api_key.startswith("sk-ant-api03-")

    # Claude Code with ANTHROPIC_AUTH_TOKEN sends its token as a Bearer token.
    claude_headers = [("Host", "127.0.0.1:3333"), ("Authorization", "Bearer any-value"),
                      ("anthropic-version", "2023-06-01")]
    official = build_upstream_request(method="POST", path="/v1/messages", query="", headers=claude_headers,
                                      provider=anthropic, key=anthropic.api_key, client=CLAUDE_CODE,
                                      remote_addr="127.0.0.1")
    assert official.url == "https://api.anthropic.com/v1/messages"
    sent = {k.lower(): v for k, v in official.headers}
    assert sent["x-api-key"] == anthropic.api_key and "authorization" not in sent

    relay = build_upstream_request(method="POST", path="/v1/messages", query="",
                                   headers=[("x-api-key", "any-value")], provider=openrouter, key=openrouter.api_key,
                                   client=CLAUDE_CODE, remote_addr="127.0.0.1")
    assert relay.url == "https://openrouter.ai/api/v1/messages"
    sent = {k.lower(): v for k, v in relay.headers}
    assert sent["authorization"] == f"Bearer {openrouter.api_key}" and "x-api-key" not in sent


def test_codex_example_providers_and_key_placement():
    providers = load_config(EXAMPLES).providers["codex"]
    assert [(p.name, p.priority, p.auth_header) for p in providers] == [
        ("openai", 1, None), ("openrouter", 2, "authorization")]
    for provider, url in zip(providers, ["https://api.openai.com/v1/responses",
                                         "https://openrouter.ai/api/v1/responses"]):
        # Codex with the README's config.toml (no env_key) sends no credential at all.
        request = build_upstream_request(method="POST", path="/v1/responses", query="", headers=[],
                                         provider=provider, key=provider.api_key, client=CODEX,
                                         remote_addr="127.0.0.1")
        assert request.url == url
        assert dict(request.headers)["Authorization"] == f"Bearer {provider.api_key}"


def test_gemini_example_providers_and_key_placement():
    providers = load_config(EXAMPLES).providers["gemini"]
    assert [(p.name, p.priority, p.auth_header) for p in providers] == [
        ("google", 1, None), ("cloudflare-gateway", 2, "x-goog-api-key")]
    google = providers[0]
    request = build_upstream_request(
        method="POST", path="/v1beta/models/gemini-2.5-pro:streamGenerateContent", query="alt=sse",
        headers=[("x-goog-api-key", "any-value")], provider=google, key=google.api_key, client=GEMINI,
        remote_addr="127.0.0.1")
    assert request.url == ("https://generativelanguage.googleapis.com/v1beta/models/"
                           "gemini-2.5-pro:streamGenerateContent?alt=sse")
    assert dict(request.headers)["x-goog-api-key"] == google.api_key


def test_every_key_is_a_placeholder():
    """Nobody should mistake an example key for a real one, nor commit one here."""
    for providers in load_config(EXAMPLES).providers.values():
        for provider in providers:
            assert "REPLACE_ME" in provider.api_key, provider


def test_quick_start_copy_runs_clipal_quietly(tmp_path, clipal):
    """The README's quick start: copy the examples, chmod 600, start clipal on them."""
    config_dir = tmp_path / "dot-clipal"
    config_dir.mkdir()
    for path in EXAMPLES.glob("*.yaml"):
        shutil.copy(path, config_dir / path.name)
        (config_dir / path.name).chmod(0o600)
    proxy = clipal(config_dir=config_dir)  # the fixture adds only --config-dir and --port
    assert requests.get(proxy.url + "/health", timeout=5).json() == {"status": "healthy"}
    out = proxy.wait_for_output("listening on")
    assert "claude-code.yaml: 2 provider(s) loaded: anthropic, openrouter" in out
    assert "codex.yaml: 2 provider(s) loaded: openai, openrouter" in out
    assert "gemini.yaml: 2 provider(s) loaded: google, cloudflare-gateway" in out
    assert "readable by other users" not in out
    assert (config_dir / "logs").is_dir(), "log_dir '' means <config-dir>/logs"
