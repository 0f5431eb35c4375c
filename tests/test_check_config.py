"""``inferd check-config`` refuses what ``serve`` would refuse (issue #13): a KEK readable by others, a KEK path with
a typo, a pinned version that is not installed or does not verify, unusable listener TLS files; and it says which
checks it could not run for want of the service's credentials instead of calling them OK. Run as the real command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, KeySet, Site, build_mlp, pack_model
from support.tls import make_pki


def check(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run([sys.executable, "-m", "daemon", "check-config", str(config)], capture_output=True,
                          text=True, cwd=REPO, env={**base, **(env or {})}, timeout=120)


@pytest.fixture
def served(site: Site, keyset: KeySet) -> Site:
    """A site whose one model is pinned to an installed version: everything checks out."""
    site.install(pack_model(keyset, build_mlp(), name="mlp", version="1"))
    site.models = [{"name": "mlp", "runtime": "onnxruntime", "version": "1"}]
    return site


def own_kek(site: Site, keyset: KeySet, mode: int, name: str = "site.kek") -> Path:
    """A copy of the test KEK in a folder of the site's own, with ``mode``."""
    folder = site.root / "keys"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    shutil.copyfile(keyset.kek_path, path)
    path.chmod(mode)
    return path


def test_a_good_config_lists_every_check_and_passes(served: Site) -> None:
    res = check(served.write_config())
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(line.startswith("ok") and "keys.kek[0]" in line and "KEK 'main'" in line for line in lines), lines
    assert any(line.startswith("ok") and "keys.signers[0]" in line for line in lines), lines
    assert any(line.startswith("ok") and "models[0] (mlp)" in line and "pinned version '1' installed" in line
               and "decrypts with KEK 'main'" in line for line in lines), lines
    assert lines[-1].endswith("OK (1 model(s))")


def test_a_kek_readable_by_others_is_refused(served: Site, keyset: KeySet) -> None:
    kek = own_kek(served, keyset, 0o644)
    served.extra = {"keys": {"kek": [{"path": str(kek)}], "signers": [{"path": str(keyset.public_path)}]}}
    res = check(served.write_config())
    assert res.returncode == 1
    assert f"keys.kek[0]: key file {kek} is readable by group or others (mode 0644); run: chmod 600 {kek}" \
        in res.stderr
    assert "OK" not in res.stdout.splitlines()[-1]


def test_a_kek_path_with_a_typo_names_the_file_meant(served: Site, keyset: KeySet) -> None:
    kek = own_kek(served, keyset, 0o600)
    typo = kek.with_name("site.kke")
    served.extra = {"keys": {"kek": [{"path": str(typo)}], "signers": [{"path": str(keyset.public_path)}]}}
    res = check(served.write_config())
    assert res.returncode == 1
    assert f"keys.kek[0]: cannot read key file {typo}: No such file or directory (did you mean '{kek}'?)" \
        in res.stderr
    folder = served.root / "nowhere" / "site.kek"
    served.extra = {"keys": {"kek": [{"path": str(folder)}], "signers": [{"path": str(keyset.public_path)}]}}
    res = check(served.write_config())
    assert res.returncode == 1 and f"(the folder {folder.parent} does not exist)" in res.stderr


def test_a_pinned_version_that_is_not_installed_is_refused(served: Site) -> None:
    served.models = [{"name": "mlp", "runtime": "onnxruntime", "version": "9"}]
    res = check(served.write_config())
    assert res.returncode == 1
    assert "models[0] (mlp): pinned version '9' is not installed in" in res.stderr
    assert "(installed: 1)" in res.stderr


def test_an_unpinned_model_with_nothing_installed_is_refused(served: Site) -> None:
    served.models = [{"name": "absent", "runtime": "onnxruntime"}]
    res = check(served.write_config())
    assert res.returncode == 1
    assert "models[0] (absent): model 'absent' has no active version in the store" in res.stderr


def test_a_tampered_pinned_version_is_refused(served: Site) -> None:
    artifact = served.state_dir / "models" / "mlp" / "1" / "artifact.inferd"
    blob = bytearray(artifact.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one bit of the encrypted payload
    artifact.chmod(0o600)
    artifact.write_bytes(bytes(blob))
    res = check(served.write_config())
    assert res.returncode == 1
    failure = [line for line in res.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failure) == 1 and "models[0] (mlp): pinned version '1':" in failure[0], res.stdout
    assert "signature" in failure[0].lower() or "integrity" in failure[0].lower() or "tamper" in failure[0].lower()


def test_checks_that_need_the_service_credentials_are_skipped_not_ok(served: Site, keyset: KeySet,
                                                                    tmp_path: Path) -> None:
    served.extra = {"keys": {"kek": [{"credential": "inferd-kek"}], "signers": [{"path": str(keyset.public_path)}]}}
    config = served.write_config()
    res = check(config)
    assert res.returncode == 0, res.stderr
    skipped = [line for line in res.stdout.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 2, res.stdout  # the KEK, and the model it would decrypt
    assert "keys.kek[0]: credential 'inferd-kek' needs the service's credentials" in skipped[0]
    assert "models[0] (mlp): pinned version '1' is installed; verifying it needs the keys of keys.kek[0]" \
        in skipped[1]
    assert "2 check(s) skipped" in res.stdout.splitlines()[-1]
    # the same config inside the service (the unit's ExecStartPre) checks both
    creds = tmp_path / "creds"
    creds.mkdir()
    shutil.copyfile(keyset.kek_path, creds / "inferd-kek")
    (creds / "inferd-kek").chmod(0o600)
    res = check(config, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert res.returncode == 0, res.stderr
    assert not [line for line in res.stdout.splitlines() if line.startswith("skipped")], res.stdout


def test_listener_tls_files_are_checked(served: Site, tmp_path: Path) -> None:
    pki, other = make_pki(tmp_path / "pki"), make_pki(tmp_path / "other", "other-ca")
    tls = {"enabled": True, "cert_file": str(pki["server"]), "key_file": str(pki["server_key"]),
           "client_ca_file": str(pki["ca"])}
    served.extra = {"grpc": {"enabled": True, "port": 0, "tls": tls}}
    res = check(served.write_config())
    assert res.returncode == 0, res.stderr
    assert any(line.startswith("ok") and "grpc.tls.cert_file" in line for line in res.stdout.splitlines())
    served.extra = {"grpc": {"enabled": True, "port": 0, "tls": {**tls, "key_file": str(other["server_key"])}}}
    res = check(served.write_config())
    assert res.returncode == 1 and "grpc.tls.cert_file:" in res.stderr and "values mismatch" in res.stderr
    missing = pki["ca"].with_name("ca.pme")
    served.extra = {"grpc": {"enabled": True, "port": 0, "tls": {**tls, "client_ca_file": str(missing)}}}
    res = check(served.write_config())
    assert res.returncode == 1
    assert f"grpc.tls.ca_file: {missing} does not exist (did you mean '{pki['ca']}'?)" in res.stderr


def test_a_grpc_key_readable_by_others_is_refused(served: Site, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    pki["server_key"].chmod(0o644)
    served.extra = {"grpc": {"enabled": True, "port": 0, "tls": {
        "enabled": True, "cert_file": str(pki["server"]), "key_file": str(pki["server_key"])}}}
    res = check(served.write_config())
    assert res.returncode == 1
    assert f"grpc.tls.key_file: key file {pki['server_key']} is readable by group or others (mode 0644)" \
        in res.stderr


def test_https_files_and_authentication_are_checked_as_serve_builds_them(served: Site, tmp_path: Path) -> None:
    pki, other = make_pki(tmp_path / "pki"), make_pki(tmp_path / "other", "other-ca")
    tls = {"enabled": True, "cert_file": str(pki["server"]), "key": {"path": str(pki["server_key"])}}
    served.extra = {"server": {"tls": tls}}
    res = check(served.write_config())
    assert res.returncode == 0, res.stderr
    assert any(line.startswith("ok") and "server.tls:" in line for line in res.stdout.splitlines()), res.stdout
    assert any(line.startswith("ok") and "auth: authentication not required" in line
               for line in res.stdout.splitlines()), res.stdout
    served.extra = {"server": {"tls": {**tls, "key": {"path": str(other["server_key"])}}}}
    res = check(served.write_config())
    assert res.returncode == 1 and f"server.tls: cannot use {pki['server']} / {other['server_key']}" in res.stderr, res.stderr
    served.extra = {"server": {"host": "0.0.0.0"}}  # noqa: S104 - a config, never bound: what serve refuses
    res = check(served.write_config())
    assert res.returncode == 1
    assert "auth: auth is required (http on 0.0.0.0 is not loopback) but no API key" in res.stderr, res.stderr
