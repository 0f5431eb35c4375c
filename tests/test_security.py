"""API keys and scopes (daemon/security.py): keys stored as hashes only, constant-time checks, precise refusals."""

from __future__ import annotations

import hmac
import json
import secrets
import stat
from pathlib import Path

import pytest

from daemon.errors import ConfigError, KeyProblem
from daemon.security import (
    SCOPES,
    Authenticator,
    Caller,
    Forbidden,
    Unauthenticated,
    add_key_to_file,
    authorize,
    new_key,
    parse_keys_file,
    parse_record,
)
from daemon.security import _Hmac as Hmac


def test_the_precomputed_hmac_is_rfc_4231s() -> None:
    # RFC 4231 test case 2, then random salts of the stored length against the standard library's HMAC
    assert Hmac(b"Jefe").digest("what do ya want for nothing?").hex() == \
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    for _ in range(20):
        salt, secret = secrets.token_bytes(16), secrets.token_urlsafe(32)
        assert Hmac(salt).digest(secret) == hmac.digest(salt, secret.encode(), "sha256")


def test_a_new_key_verifies_and_only_its_hash_is_stored() -> None:
    token, key = new_key("billing-app", ["infer", "read"], ["fraud"])
    record = json.dumps(key.record())
    secret = token.split("_", 2)[2]
    assert secret not in record and token not in record and secret not in repr(key)
    caller = Authenticator([parse_record(json.loads(record), "test")]).from_header(f"Bearer {token}")
    assert caller == Caller("billing-app", frozenset({"infer", "read"}), frozenset({"fraud"}), "key")


@pytest.mark.parametrize(
    ("header", "says"),
    [
        (None, "needs an API key"),
        ("Basic dXNlcjpwYXNz", "unsupported Authorization scheme"),
        ("Bearer", "not an inferd API key"),
        ("Bearer not-a-key", "not an inferd API key"),
        ("Bearer " + "x" * 600, "too long"),
        ("Bearer ifd_000000000000_" + "A" * 43, "not valid"),  # an id nobody has
    ],
)
def test_malformed_or_unknown_credentials_are_refused_with_the_reason(header: str | None, says: str) -> None:
    _, key = new_key("a", ["infer"])
    with pytest.raises(Unauthenticated, match=says):
        Authenticator([key]).from_header(header)


def test_a_key_with_one_wrong_character_is_refused() -> None:
    token, key = new_key("a", ["infer"])
    last = token[-1]
    forged = token[:-1] + ("A" if last != "A" else "B")
    with pytest.raises(Unauthenticated, match="not valid"):
        Authenticator([key]).from_header(f"Bearer {forged}")
    assert Authenticator([key]).from_header(f"bearer  {token} ").name == "a"  # scheme case and spaces are fine


def test_headers_of_the_usual_length_are_checked_whatever_their_characters() -> None:
    token, key = new_key("a", ["infer"])
    auth = Authenticator([key])
    for forged in (token[:-1] + "\u00e9", token[:10] + "zz" + token[12:], token[:-2] + "!!"):
        assert len(forged) == len(token)
        with pytest.raises(Unauthenticated):
            auth.from_header(f"Bearer {forged}")
    assert auth.from_header(f"Bearer {token}").name == "a"


def test_authorize_names_the_missing_scope_and_the_model() -> None:
    caller = Caller("c", frozenset({"infer"}), frozenset({"m1"}), "key")
    authorize(caller, "infer", "m1")
    with pytest.raises(Forbidden, match="lacks the 'admin' scope"):
        authorize(caller, "admin", None)
    with pytest.raises(Forbidden, match="may not use model 'm2'"):
        authorize(caller, "infer", "m2")
    authorize(Caller("all", frozenset(SCOPES), None, "key"), "infer", "any-model")


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"name": "a", "id": "0" * 12, "hash": "plain", "scopes": ["infer"]}, "hmac-sha256"),
        ({"name": "a", "id": "xyz", "hash": "hmac-sha256:" + "0" * 32 + ":" + "0" * 64, "scopes": ["infer"]}, "'id'"),
        ({"name": "a", "id": "0" * 12, "hash": "hmac-sha256:" + "0" * 32 + ":" + "0" * 64, "scopes": ["root"]},
         "unknown scope"),
        ({"name": "a", "id": "0" * 12, "hash": "hmac-sha256:" + "0" * 32 + ":" + "0" * 64, "scopes": []},
         "at least one scope"),
        ({"name": "a", "id": "0" * 12, "hash": "hmac-sha256:" + "0" * 32 + ":" + "0" * 64, "scopes": ["infer"],
          "key": "ifd_..."}, "unknown field"),
    ],
)
def test_bad_records_are_refused_with_where_and_why(entry: dict, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_record(entry, "auth.keys[0]")


def test_add_key_appends_to_a_0600_file_and_refuses_a_duplicate_name(tmp_path: Path) -> None:
    path = tmp_path / "api-keys.json"
    t1 = add_key_to_file(path, "app-1", ["infer"], None)
    t2 = add_key_to_file(path, "ops", ["admin", "read"], None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert t1 not in text and t2 not in text
    auth = Authenticator(parse_keys_file(path.read_bytes(), str(path)))
    assert auth.from_header(f"Bearer {t1}").name == "app-1"
    assert auth.from_header(f"Bearer {t2}").scopes == frozenset({"admin", "read"})
    with pytest.raises(ConfigError, match="exists already"):
        add_key_to_file(path, "ops", ["read"], None)


def test_a_keys_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "api-keys.json"
    add_key_to_file(path, "app", ["infer"], None)
    path.chmod(0o644)
    with pytest.raises(KeyProblem, match="readable by group or others"):
        add_key_to_file(path, "other", ["infer"], None)


def test_certificate_identities_map_to_callers() -> None:
    device = Caller("device-17", frozenset({"infer"}), None, "mtls")
    auth = Authenticator([], {"device-17.example": device})
    assert auth.from_certificate(["unknown", "device-17.example"]) is device
    assert auth.from_certificate(["stranger"]) is None
