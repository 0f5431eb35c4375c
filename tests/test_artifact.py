"""The encrypted artifact: round trip, and every way it can be damaged or mis-keyed giving its own error."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, KeySet, pack_model
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from daemon import artifact, keys
from daemon.artifact import (
    ArtifactFormatError,
    ChunkTampered,
    HeaderTampered,
    SignatureInvalid,
    Truncated,
    UnknownKeyId,
    UntrustedSigner,
    WrongKey,
    open_artifact,
    read_header,
)

CHUNK = 1024


@pytest.fixture
def big_model() -> bytes:
    """Random bytes standing in for a model: several chunks, and a pattern we can look for on disk."""
    return os.urandom(5 * CHUNK + 100)


def trusted(keyset: KeySet) -> tuple[dict, dict]:
    pub = keys.load_public_key(keyset.public_path)
    return {keyset.kek.key_id: keyset.kek}, {keys.signer_id(pub): pub}


def test_round_trip(keyset: KeySet, big_model: bytes) -> None:
    ref = np.arange(8, dtype=np.float32).reshape(2, 4)
    blob = pack_model(
        keyset,
        big_model,
        extra_files={"smoke/input/input.npy": artifact.npy_bytes(ref), "smoke/output/output.npy": artifact.npy_bytes(ref)},
        metadata={"labels": ["a", "b"]},
        chunk_size=CHUNK,
    )
    keks, signers = trusted(keyset)
    opened = open_artifact(blob, keks, signers)
    assert opened.model_files() == {"model.onnx": big_model}
    assert opened.metadata == {"labels": ["a", "b"]}
    ins, outs = opened.reference()  # type: ignore[misc]
    np.testing.assert_array_equal(ins["input"], ref)
    np.testing.assert_array_equal(outs["output"], ref)
    assert opened.header.name == "mlp" and opened.header.version == "1" and opened.header.runtime == "onnxruntime"
    assert big_model not in blob  # the payload is really encrypted


def test_empty_and_exact_chunk_payloads(keyset: KeySet) -> None:
    keks, signers = trusted(keyset)
    for size in (1, CHUNK - 4, 4 * CHUNK):
        model = os.urandom(size)
        assert open_artifact(pack_model(keyset, model, chunk_size=CHUNK), keks, signers).files["model.onnx"] == model


def _layout(blob: bytes) -> tuple[int, int, int]:
    """(start of the header tag, start of the chunks, start of the signature)."""
    _, tag_at = read_header(blob)
    return tag_at, tag_at + artifact.TAG_LEN, len(blob) - artifact.SIG_LEN


def test_tampered_header_is_detected(keyset: KeySet, big_model: bytes) -> None:
    blob = pack_model(keyset, big_model, chunk_size=CHUNK)
    tag_at, _, _ = _layout(blob)
    # flip the model name inside the JSON header, keeping it valid JSON of the same length
    assert b'"name":"mlp"' in blob[:tag_at]
    tampered = blob.replace(b'"name":"mlp"', b'"name":"mlq"', 1)
    keks, signers = trusted(keyset)
    with pytest.raises(HeaderTampered, match="header authentication failed"):
        open_artifact(tampered, keks, signers)


def test_tampered_chunk_is_detected(keyset: KeySet, big_model: bytes) -> None:
    blob = bytearray(pack_model(keyset, big_model, chunk_size=CHUNK))
    _, chunks_at, _ = _layout(bytes(blob))
    blob[chunks_at + 2 * (CHUNK + 16) + 5] ^= 0x01
    keks, signers = trusted(keyset)
    with pytest.raises(ChunkTampered, match="chunk 2 failed authentication"):
        open_artifact(bytes(blob), keks, signers)


def test_reordered_chunks_are_detected(keyset: KeySet, big_model: bytes) -> None:
    blob = pack_model(keyset, big_model, chunk_size=CHUNK)
    _, at, sig = _layout(blob)
    size = CHUNK + 16
    c0, c1 = blob[at : at + size], blob[at + size : at + 2 * size]
    swapped = blob[:at] + c1 + c0 + blob[at + 2 * size :]
    assert len(swapped) == len(blob)
    keks, signers = trusted(keyset)
    with pytest.raises(ChunkTampered, match="chunk 0"):
        open_artifact(swapped, keks, signers)


def test_truncated_artifacts_are_detected(keyset: KeySet, big_model: bytes) -> None:
    blob = pack_model(keyset, big_model, chunk_size=CHUNK)
    _, at, sig = _layout(blob)
    keks, signers = trusted(keyset)
    # drop one whole chunk's worth of ciphertext but keep the signature trailer
    cut = blob[: sig - (CHUNK + 16)] + blob[sig:]
    with pytest.raises(Truncated, match="truncated"):
        open_artifact(cut, keks, signers)
    # cut inside the header
    with pytest.raises(Truncated):
        open_artifact(blob[:20], keks, signers)


def _forge_truncated(keyset: KeySet, blob: bytes, drop: int, last_flag_on_new_end: bool) -> bytes:
    """``blob`` cut to its first chunks minus ``drop``, re-tagged and re-signed as only the key holders could: the
    header claims the shorter payload, its tag and every kept chunk are valid again under the new header (the chunks'
    associated data is the header's hash), and each kept chunk keeps the last-chunk flag it was packed with unless
    ``last_flag_on_new_end`` re-encrypts the new final chunk as a last one. So only the flag can tell."""
    header, tag_at = read_header(blob)
    data_key = AESGCM(keyset.kek.key).decrypt(header.wrap_nonce, header.wrapped_key, artifact._wrap_aad(header.kek_id))
    old_aad = hashlib.sha256(blob[:tag_at]).digest()
    count = -(-header.payload_size // header.chunk_size)
    at = tag_at + artifact.TAG_LEN
    size = header.chunk_size + artifact.TAG_LEN
    plain = [AESGCM(data_key).decrypt(artifact._nonce(header.nonce_prefix, i, i == count - 1),
                                      blob[at + i * size : at + (i + 1) * size], old_aad) for i in range(count - drop)]
    doc = json.loads(blob[struct.calcsize(">8sHI") : tag_at])
    doc["payload_size"] = sum(len(p) for p in plain)
    new_header = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    prefix = blob[:8] + struct.pack(">HI", 1, len(new_header)) + new_header
    aead = AESGCM(data_key)
    parts = [prefix, aead.encrypt(artifact._nonce(header.nonce_prefix, artifact._HEADER_TAG_INDEX, True), b"", prefix)]
    aad = hashlib.sha256(prefix).digest()
    for i, chunk in enumerate(plain):
        last = last_flag_on_new_end and i == len(plain) - 1
        parts.append(aead.encrypt(artifact._nonce(header.nonce_prefix, i, last), chunk, aad))
    body = b"".join(parts)
    return body + keyset.signing_key.sign(artifact._SIG_CONTEXT + hashlib.sha256(body).digest())


def test_truncation_at_a_chunk_boundary_is_caught_by_the_last_chunk_flag(keyset: KeySet) -> None:
    """Even a header that claims the shorter size, with a valid tag and signature, cannot make chunk n-2 pass as
    the last chunk: it was encrypted as "not last", and only that flag differs from a well-formed artifact."""
    blob = pack_model(keyset, os.urandom(3 * CHUNK), chunk_size=CHUNK)  # payload: 4 + manifest + 3 KiB: 4 chunks
    keks, signers = trusted(keyset)
    assert read_header(blob)[0].payload_size > 3 * CHUNK
    with pytest.raises(ChunkTampered, match="chunk 2 failed authentication"):
        open_artifact(_forge_truncated(keyset, blob, drop=1, last_flag_on_new_end=False), keks, signers)
    # the control: the same forgery with the flag set on its new end passes every chunk check and fails only where
    # the payload no longer holds its files, so the error above came from the flag and nothing else
    with pytest.raises(ArtifactFormatError, match="artifact payload is malformed: file sizes exceed the payload"):
        open_artifact(_forge_truncated(keyset, blob, drop=1, last_flag_on_new_end=True), keks, signers)


def test_wrong_kek(keyset: KeySet, big_model: bytes, tmp_path: Path) -> None:
    blob = pack_model(keyset, big_model, chunk_size=CHUNK)
    other = keys.generate_kek(tmp_path / "other.kek", keyset.kek.key_id)  # same id, different key
    _, signers = trusted(keyset)
    with pytest.raises(WrongKey, match="does not decrypt"):
        open_artifact(blob, {other.key_id: other}, signers)


def test_unknown_key_id(keyset: KeySet, big_model: bytes, tmp_path: Path) -> None:
    blob = pack_model(keyset, big_model)
    other = keys.generate_kek(tmp_path / "other.kek", "other")
    _, signers = trusted(keyset)
    with pytest.raises(UnknownKeyId, match="key id 'main', which is not configured"):
        open_artifact(blob, {"other": other}, signers)


def test_bad_signature(keyset: KeySet, big_model: bytes) -> None:
    blob = bytearray(pack_model(keyset, big_model))
    blob[-1] ^= 0xFF
    keks, signers = trusted(keyset)
    with pytest.raises(SignatureInvalid, match="signature .* is invalid"):
        open_artifact(bytes(blob), keks, signers)


def test_wrong_signing_key(keyset: KeySet, big_model: bytes, tmp_path: Path) -> None:
    keys.generate_signing_key(tmp_path / "rogue.key")
    rogue = keys.load_signing_key(tmp_path / "rogue.key")
    blob = artifact.pack(
        {"model.onnx": big_model}, name="m", version="1", runtime="onnxruntime", kek=keyset.kek, signing_key=rogue
    )
    keks, signers = trusted(keyset)
    with pytest.raises(UntrustedSigner, match="not a trusted signer"):
        open_artifact(blob, keks, signers)
    # with signatures not required, an unknown signer is accepted; a known signer is always verified
    assert open_artifact(blob, keks, signers, require_signature=False).files["model.onnx"] == big_model


def test_not_an_artifact(keyset: KeySet) -> None:
    keks, signers = trusted(keyset)
    with pytest.raises(ArtifactFormatError, match="bad magic"):
        open_artifact(b"\x08\x07onnx-model-bytes" * 10, keks, signers)


def test_runtime_and_files_must_agree(keyset: KeySet, mlp_onnx: bytes) -> None:
    with pytest.raises(ValueError, match="runtime litert reads .tflite files, not model.onnx"):
        pack_model(keyset, mlp_onnx, runtime="litert")


def _scan_for(root: Path, needle: bytes) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            try:
                if needle in path.read_bytes():
                    found.append(path)
            except OSError:
                pass
    return found


def test_no_plaintext_model_on_disk_during_pack_install_and_serve(
    keyset: KeySet, tmp_path: Path, mlp_onnx: bytes, start_daemon, site
) -> None:
    """Pack, install and serve with TMPDIR pointed at folders we then scan for the model's bytes."""
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    src.write_bytes(mlp_onnx)
    work_tmp = tmp_path / "tmp"
    work_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(work_tmp)}
    out = tmp_path / "out" / "mlp.inferd"
    run = [sys.executable, "-m", "daemon"]
    subprocess.run(
        [*run, "model", "pack", str(src), "--name", "mlp", "--version", "1", "--runtime", "onnxruntime",
         "--kek", str(keyset.kek_path), "--signing-key", str(keyset.signing_path), "-o", str(out)],
        check=True, env=env, cwd=REPO, capture_output=True,
    )
    site.models = [{"name": "mlp", "runtime": "onnxruntime"}]
    config = site.write_config()
    subprocess.run([*run, "model", "install", str(out), "--config", str(config)], check=True, env=env, cwd=REPO,
                   capture_output=True)
    daemon = start_daemon(config, env={"TMPDIR": str(work_tmp)})
    assert daemon.proc.poll() is None
    # a distinctive slice of the model: the serialized weights
    needle = mlp_onnx[len(mlp_onnx) // 2 : len(mlp_onnx) // 2 + 64]
    assert _scan_for(work_tmp, needle) == []
    assert _scan_for(site.root, needle) == []
    assert _scan_for(out.parent, needle) == []
    assert daemon.stop() == 0


# --- a malformed header names what is wrong with it ----------------------------------------------------------


_REMOVE = object()
_MALFORMED = "artifact header is malformed: "


def _header_doc(blob: bytes) -> dict:
    _, tag_at = read_header(blob)
    return json.loads(blob[artifact._PREFIX.size : tag_at])


def _with_header(blob: bytes, header: bytes) -> bytes:
    """The artifact with its header JSON replaced (length prefix updated), as a damaged or foreign file would be."""
    _, tag_at = read_header(blob)
    return blob[:8] + struct.pack(">HI", 1, len(header)) + header + blob[tag_at:]


def _doc_with(blob: bytes, **changes: object) -> bytes:
    doc = _header_doc(blob)
    for key, value in changes.items():
        if value is _REMOVE:
            del doc[key]
        else:
            doc[key] = value
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()



@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"created": _REMOVE}, "the field 'created' is missing"),
        ({"format": _REMOVE}, "the field 'format' is missing"),
        ({"chunk_size": "1024"}, "the field 'chunk_size' must be an integer, found a string"),
        ({"chunk_size": 1024.0}, "the field 'chunk_size' must be an integer, found a number"),
        ({"format": True}, "the field 'format' must be an integer, found a boolean"),
        ({"name": None}, "the field 'name' must be a string, found null"),
        ({"kek_id": ["main"]}, "the field 'kek_id' must be a string, found a list"),
        ({"info": "labels"}, "the field 'info' must be an object, found a string"),
        ({"format": 2}, "the field 'format' says 2, the prefix says 1"),
        ({"chunk_size": 0}, "the field 'chunk_size' must be at least 1, found 0"),
        ({"payload_size": -1}, "the field 'payload_size' must be at least 0, found -1"),
        ({"wrap_nonce": "not base64!"}, "the field 'wrap_nonce' is not valid base64"),
        ({"nonce_prefix": "AAAAAAAA"}, "the field 'nonce_prefix' must decode to 7 bytes, found 6"),
    ],
)
def test_malformed_header_fields_are_named(keyset: KeySet, changes: dict, expected: str) -> None:
    blob = pack_model(keyset, b"model")
    with pytest.raises(ArtifactFormatError) as err:
        read_header(_with_header(blob, _doc_with(blob, **changes)))
    assert str(err.value) == _MALFORMED + expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b'{"format":1,\xff}', "not valid UTF-8 (byte 0xff at offset 12)"),
        (b'{"format":1,', "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 13 "
                          "(char 12))"),
        (b"[1,2]", "not a JSON object but a list"),
        (b'"header"', "not a JSON object but a string"),
    ],
)
def test_a_header_that_is_not_a_json_object_says_so(keyset: KeySet, header: bytes, expected: str) -> None:
    blob = pack_model(keyset, b"model")
    with pytest.raises(ArtifactFormatError) as err:
        read_header(_with_header(blob, header))
    assert str(err.value) == _MALFORMED + expected


def test_a_flipped_header_byte_is_named_by_inspect(tmp_path: Path, keyset: KeySet) -> None:
    """The case met: one bit flipped in a field's name, through `inferd model inspect`."""
    blob = bytearray(pack_model(keyset, b"model"))
    at = bytes(blob).index(b'"created"') + 3
    blob[at] ^= 0x01  # "created" -> "crdated"
    path = tmp_path / "flipped.inferd"
    path.write_bytes(bytes(blob))
    res = subprocess.run([sys.executable, "-m", "daemon", "model", "inspect", str(path)], capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert res.returncode == 1
    assert res.stderr.strip() == "inferd: error: artifact header is malformed: the field 'created' is missing"


def test_pack_refuses_names_the_store_would_refuse(keyset: KeySet) -> None:
    with pytest.raises(ValueError, match=r"^invalid model name 'bc model': model names and versions are 1 to 128 "):
        pack_model(keyset, b"model", name="bc model")
    with pytest.raises(ValueError, match=r"^invalid version '\.\.': "):
        pack_model(keyset, b"model", version="..")
