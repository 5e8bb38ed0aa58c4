"""The access rule (clipal.access.check), pure: peers, hosts, origins, tokens."""

from __future__ import annotations

import pytest

from clipal.access import AccessPolicy, AccessToken, Allowed, Refused, check, is_loopback_address

ALICE = AccessToken("alice", "alice-token-0123456789")
BOB = AccessToken("bob", "bob-token-abcdefghijkl")
WITH_TOKENS = AccessPolicy.build([ALICE, BOB], [], [])
OPEN = AccessPolicy.build([], [], [])


def decide(policy=OPEN, *, peer="127.0.0.1", host="127.0.0.1:3333", origin=None, credentials=()):
    return check(policy, peer=peer, host=host, origin=origin, credentials=list(credentials))


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.1", ""])
def test_loopback_peers_are_served_without_tokens(peer):
    assert decide(peer=peer) == Allowed(None)


@pytest.mark.parametrize("peer", ["10.0.0.5", "192.168.1.2", "::ffff:10.0.0.1", "fe80::1", "garbage"])
def test_other_peers_are_refused_without_tokens_naming_access_tokens(peer):
    answer = decide(peer=peer)
    assert isinstance(answer, Refused) and answer.status == 403 and "access_tokens" in answer.message


@pytest.mark.parametrize("host", ["127.0.0.1:3333", "localhost:3333", "LOCALHOST", "localhost.", "[::1]:3333",
                                  "::1", "127.0.0.2", "app.localhost:1", ""])
def test_local_hosts_are_served_without_tokens(host):
    assert decide(host=host) == Allowed(None)


@pytest.mark.parametrize("host", ["rebind.example:3333", "evil.com", "10.0.0.1:3333", "localhost.evil.com"])
def test_other_hosts_are_refused_without_tokens(host):
    answer = decide(host=host)
    assert isinstance(answer, Refused) and answer.status == 403 and "allowed_hosts" in answer.message


def test_a_host_in_allowed_hosts_is_served():
    policy = AccessPolicy.build([], [], ["clipal.lan"])
    assert decide(policy, host="CLIPAL.lan:3333") == Allowed(None)
    assert isinstance(decide(policy, host="other.lan"), Refused)


@pytest.mark.parametrize("policy", [OPEN, WITH_TOKENS], ids=["no-tokens", "tokens"])
def test_a_browser_origin_is_refused_unless_allowed(policy):
    answer = decide(policy, origin="https://evil.example", credentials=[ALICE.token])
    assert isinstance(answer, Refused) and answer.status == 403 and "allowed_origins" in answer.message
    allowed = AccessPolicy.build(policy.tokens, ["https://Good.example/"], [])
    assert isinstance(decide(allowed, origin="https://good.example", credentials=[ALICE.token]), Allowed)


def test_with_tokens_the_matching_token_is_named():
    assert decide(WITH_TOKENS, credentials=[BOB.token]) == Allowed("bob")
    assert decide(WITH_TOKENS, credentials=["something-else-entirely", ALICE.token]) == Allowed("alice")


@pytest.mark.parametrize("credentials", [
    [], ["wrong-token-0123456789"], [ALICE.token[:-1]], [ALICE.token + "x"], [ALICE.token.upper()],
    [" " + ALICE.token], ["é" + ALICE.token[1:]],
], ids=["none", "wrong", "prefix", "extension", "case", "space", "non-ascii"])
def test_with_tokens_a_missing_wrong_or_near_miss_token_is_401(credentials):
    answer = decide(WITH_TOKENS, credentials=credentials)
    assert isinstance(answer, Refused) and answer.status == 401
    assert ALICE.token not in answer.message + answer.reason


def test_with_tokens_any_peer_and_host_is_served():
    assert decide(WITH_TOKENS, peer="203.0.113.9", host="clipal.example.com", credentials=[ALICE.token]) \
        == Allowed("alice")


def test_a_token_never_shows_in_a_repr():
    assert ALICE.token not in repr(ALICE) and ALICE.token not in repr(WITH_TOKENS)


def test_loopback_detection():
    assert is_loopback_address("127.0.0.1") and is_loopback_address("::1")
    assert not is_loopback_address("0.0.0.0") and not is_loopback_address("1.2.3.4")
