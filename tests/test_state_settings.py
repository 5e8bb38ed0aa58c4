"""state_url and state_prefix as config.yaml gives them, and the store they choose (no Redis needed)."""

from __future__ import annotations

import sys
import time

import pytest

from clipal.config import ConfigError, Settings, parse_settings, public_url
from clipal.redis_store import RedisStore
from clipal.runtime import open_store
from clipal.store import MemoryStore


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "redis://127.0.0.1", "rediss://:pw@redis.lan:6380/2",
                                 "redis://user:pw@h:1/15", "unix:///run/redis/redis.sock?db=1", "  redis://h/3  "])
def test_redis_urls_are_accepted(url):
    assert parse_settings({"state_url": url}).state_url == url.strip()


@pytest.mark.parametrize("url,message", [
    ("http://localhost:6379", "state_url must be a redis://, rediss:// or unix:// URL"),
    ("localhost:6379", "state_url must be a redis://, rediss:// or unix:// URL"),
    ("redis://h:70000/0", "state_url is not a valid URL"),
    ("redis://h/zero", "state_url may end only in a database number"),
    ("unix://", "state_url needs the socket's path"),
])
def test_other_urls_are_one_line_config_errors(url, message):
    with pytest.raises(ConfigError) as error:
        parse_settings({"state_url": url})
    assert str(error.value).startswith(f"config.yaml: {message}") and "\n" not in str(error.value)


def test_an_error_never_shows_the_password():
    with pytest.raises(ConfigError) as error:
        parse_settings({"state_url": "redis://:s3cret-pass@h:1/x"})
    assert "s3cret" not in str(error.value) and "redis://:***@h:1/x" in str(error.value)
    assert public_url("rediss://alice:s3cret@h:6380/1") == "rediss://alice:***@h:6380/1"
    assert public_url("redis://h:6379/0") == "redis://h:6379/0"


@pytest.mark.parametrize("value,message", [("", "must not be empty"), ("two words", "whitespace"),
                                           (7, "must be a string")])
def test_a_prefix_is_a_non_empty_word(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_settings({"state_prefix": value})
    assert parse_settings({"state_prefix": "team:a"}).state_prefix == "team:a"
    assert parse_settings({"state_prefix": None}).state_prefix == "clipal"  # blank: the default


def test_without_state_url_the_state_is_this_processs_memory():
    store = open_store(Settings())
    assert isinstance(store, MemoryStore) and store.describe() == {"backend": "memory"}


def test_with_state_url_the_store_is_redis_before_it_is_ever_asked():
    store = open_store(parse_settings({"state_url": "redis://127.0.0.1:1/0", "state_prefix": "t"}))
    assert isinstance(store, RedisStore) and (store.url, store.prefix) == ("redis://127.0.0.1:1/0", "t")
    assert store.describe() == {"backend": "redis", "connected": True}  # nothing has failed yet


def test_without_redis_py_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` raises ImportError
    with pytest.raises(ConfigError) as error:
        RedisStore("redis://127.0.0.1:1/0", "clipal", clock=time.time)
    assert str(error.value) == "config.yaml: state_url needs the redis package: pip install 'clipal[redis]'"
