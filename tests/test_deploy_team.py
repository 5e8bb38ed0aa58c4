"""The team box as documented: its systemd unit, and the README section kept the same in both languages."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from clipal.config import parse_settings
from test_readme import README, README_ZH, code_blocks_of, section

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "clipal-team.service"


def read_unit() -> configparser.ConfigParser:
    # Repeated keys (Environment=) are all kept, joined by newlines.
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"),
                                       dict_type=_MultiDict)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT, encoding="utf-8")
    return parser


class _MultiDict(dict):
    def __setitem__(self, key: str, value: object) -> None:
        if isinstance(value, list) and key in self and isinstance(self[key], list):
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def test_team_unit_runs_gunicorn_with_several_workers_beside_redis_without_needing_it():
    unit = read_unit()
    service = unit["Service"]
    assert service["ExecStart"] == "/opt/clipal/.venv/bin/gunicorn -c /opt/clipal/deploy/gunicorn.conf.py " \
                                   "clipal.wsgi:app"
    environment = dict(line.split("=", 1) for line in service["Environment"].split("\n"))
    assert environment == {"CLIPAL_CONFIG_DIR": "/etc/clipal", "CLIPAL_BIND": "0.0.0.0:3333", "CLIPAL_WORKERS": "4"}
    assert service["User"] == "clipal" and service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM" and service["TimeoutStopSec"] == "15s"  # above gunicorn's 5 s drain
    # Redis starts first, but clipal does not fail with it: Wants=, never Requires= or BindsTo=.
    assert "redis-server.service" in unit["Unit"]["Wants"] and "redis-server.service" in unit["Unit"]["After"]
    assert "Requires" not in unit["Unit"] and "BindsTo" not in unit["Unit"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.live
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_team_unit_passes_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart exists: check a copy whose paths point at a stand-in.
    executable = tmp_path / "gunicorn"
    executable.write_text("#!/bin/sh\nexit 0\n")
    executable.chmod(0o755)
    unit = tmp_path / "clipal-team.service"
    unit.write_text(UNIT.read_text().replace("/opt/clipal/.venv/bin/gunicorn", str(executable))
                    .replace("WorkingDirectory=/opt/clipal", f"WorkingDirectory={tmp_path}")
                    .replace("User=clipal", "User=root").replace("Group=clipal", "Group=root"))
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "notice"}
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], env=env, capture_output=True, text=True,
                            timeout=60)
    # Only our unit's complaints count (the host's own units may be incomplete in a container).
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "clipal-team" in line]
    assert problems == [], result.stdout + result.stderr


def team_sections() -> tuple[str, str]:
    return section(README, "A team box"), section(README_ZH, "团队共用的机器")


def test_the_team_box_section_has_the_same_code_in_both_readmes():
    english, chinese = (code_blocks_of(text) for text in team_sections())
    assert english and english == chinese


def test_the_team_box_config_loads_and_names_a_shared_store():
    english, _ = team_sections()
    (document,) = [yaml.safe_load(body) for lang, body in code_blocks_of(english) if lang == "yaml"]
    settings = parse_settings(document)
    assert settings.state_url.startswith("redis://") and settings.access_tokens
    deploy = (DEPLOY / "README.md").read_text()
    (documented,) = [yaml.safe_load(body) for lang, body in code_blocks_of(section(DEPLOY / "README.md",
                     "A team box: gunicorn workers sharing one state through Redis")) if lang == "yaml"]
    assert parse_settings(documented).state_url == settings.state_url
    assert "clipal-team.service" in deploy
