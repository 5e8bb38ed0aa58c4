"""The three client kinds clipal serves, in one table.

A client kind bundles what differs between Claude Code, Codex CLI and Gemini
CLI: the URL prefix, the config file, where the API key goes by default, and
the JSON shape of an error so that the agent's SDK surfaces clipal's own
errors as ordinary API errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

# The status names Gemini (google.rpc.Code) uses for the statuses clipal produces.
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    426: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

# Anthropic's error types for the statuses clipal produces.
_ANTHROPIC_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    426: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
}

# OpenAI's (type, code) pairs for the statuses clipal produces.
_OPENAI_TYPE = {
    400: ("invalid_request_error", "invalid_request"),
    404: ("invalid_request_error", "not_found"),
    413: ("invalid_request_error", "request_too_large"),
    426: ("invalid_request_error", "upgrade_required"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "proxy_error"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "no_provider_available"),
    504: ("server_error", "gateway_timeout"),
}


def _anthropic_error(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPE.get(status, "api_error"), "message": message}}


def _openai_error(status: int, message: str) -> dict:
    error_type, code = _OPENAI_TYPE.get(status, ("server_error", "proxy_error"))
    return {"error": {"message": message, "type": error_type, "code": code}}


def _gemini_error(status: int, message: str) -> dict:
    return {"error": {"code": status, "message": message, "status": _GOOGLE_STATUS.get(status, "UNKNOWN")}}


@dataclass(frozen=True)
class ClientKind:
    #: short name, used in logs and as the failover-state key: "claudecode"
    name: str
    #: URL prefix, a whole path segment: "/claudecode"
    prefix: str
    #: config file in the config directory: "claude-code.yaml"
    file: str
    #: where the provider key goes when nothing else decides (the last rule of outbound.choose_carrier)
    default_carrier: str
    _error_shape: Callable[[int, str], dict]
    #: the path of this client's token-counting requests, which may keep their own
    #: failover cursor (ignore_count_tokens_failover); None when it has none
    count_tokens_path: str | None = None
    #: paths this client's SDK may send without their version segment (its base URL can be
    #: set with or without /v1); outbound.upstream_path puts /v1 in front of them when the
    #: provider's base_url does not end in a version itself
    bare_paths: tuple[str, ...] = ()

    def is_count_tokens(self, subpath: str) -> bool:
        """Whether a request for ``subpath`` (the path after the prefix) counts tokens."""
        return self.count_tokens_path is not None and subpath.rstrip("/").endswith(self.count_tokens_path)

    def error_body(self, status: int, message: str) -> bytes:
        """A JSON error in this client's own shape, so its SDK raises a normal API error."""
        return json.dumps(self._error_shape(status, message)).encode()


CLAUDE_CODE = ClientKind("claudecode", "/claudecode", "claude-code.yaml", "x-api-key", _anthropic_error,
                         count_tokens_path="/v1/messages/count_tokens")
CODEX = ClientKind("codex", "/codex", "codex.yaml", "authorization", _openai_error,
                   bare_paths=("/responses", "/chat/completions", "/completions", "/embeddings", "/models"))
GEMINI = ClientKind("gemini", "/gemini", "gemini.yaml", "x-goog-api-key", _gemini_error)

CLIENTS: tuple[ClientKind, ...] = (CLAUDE_CODE, CODEX, GEMINI)
