"""Packaging for clipal: a local failover proxy for command-line coding agents."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "clipal" / "__init__.py").read_text(), re.M
).group(1)

setup(
    name="clipal",
    version=VERSION,
    description="A small, fast failover reverse proxy for Claude Code, Codex CLI and Gemini CLI",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["clipal", "clipal.*"]),
    install_requires=[
        "gevent>=23.9",
        "requests>=2.31",
        "urllib3>=2,<3",  # imported directly (clipal.transport); requests still admits 1.x
        "Flask>=3.0",
        "PyYAML>=6.0",
        "packaging>=23",
        "brotli>=1.2",
        "zstandard>=0.22",
        "prometheus_client>=0.20",  # /metrics (clipal.metrics): text format, multiprocess mode for gunicorn
        "inotify-simple>=1.3; sys_platform == 'linux'",
    ],
    extras_require={
        # state_url: processes (gunicorn workers, several hosts) sharing one failover state.
        "redis": ["redis>=5"],
        "test": [
            "pytest>=7.4",
            "responses>=0.24",
            "anthropic>=0.40",
            "openai>=1.50",
            "google-genai>=1.0",
            "gunicorn>=22.0",
            "redis>=5",
        ],
    },
    entry_points={"console_scripts": ["clipal=clipal.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX",
        "Operating System :: MacOS",
        "Operating System :: Microsoft :: Windows",
    ],
)
