"""What ``serve`` would refuse, checked without serving: key files, pinned model versions, listener TLS files.

``inferd check-config`` (the unit's ``ExecStartPre``) and the SIGHUP reload run these same checks, so a config that
passes one is one the other accepts. Each check reuses the code ``serve`` runs (:mod:`daemon.keys` for key files and
their modes, :func:`open_version` for a model version, which the model manager loads through too), so the two cannot
drift apart. Everything is read and decrypted in memory; nothing is written.

A check that needs the service's credentials (a ``credential:`` key source while ``$CREDENTIALS_DIRECTORY`` is not
set, as when an operator runs check-config by hand) is reported as *skipped* with that reason, never as OK; the
reload, which runs inside the service, counts it as a failure, as ``serve`` would.
"""

from __future__ import annotations

import difflib
import os
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from daemon import keys
from daemon.artifact import OpenedArtifact, open_artifact
from daemon.config import Config, KeySource, ModelConfig
from daemon.errors import ArtifactMismatch, InferdError, ModelNotFound
from daemon.store import Store

Status = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True)
class Finding:
    check: str  # the config key path it is about: keys.kek[0], models[1] (mlp), grpc.tls.cert_file
    status: Status
    detail: str

    def line(self) -> str:
        return f"{self.status.upper() if self.status == 'failed' else self.status:7} {self.check}: {self.detail}"


@dataclass
class Report:
    """The findings of one run, and the keys that loaded (what a reload then loads models with)."""

    findings: list[Finding] = field(default_factory=list)
    keks: dict[str, keys.Kek] = field(default_factory=dict)
    signers: dict[str, Ed25519PublicKey] = field(default_factory=dict)

    def add(self, check: str, status: Status, detail: str) -> None:
        self.findings.append(Finding(check, status, detail))

    def of(self, status: Status) -> list[Finding]:
        return [f for f in self.findings if f.status == status]

    @property
    def ok(self) -> bool:
        return not self.of("failed")

    def reasons(self) -> str:
        """The failures in one line: what a rejected reload logs and reports in STATUS=."""
        return "; ".join(f"{f.check}: {f.detail}" for f in self.of("failed"))


def run_checks(config: Config, models: Iterable[ModelConfig] | None = None, *, in_service: bool = False) -> Report:
    """Every check, in the order ``serve`` meets them. ``models``: the models whose versions to verify (default:
    all; a reload verifies only those it will load). ``in_service``: inside the daemon a credential that cannot be
    read is a failure, as at start-up, rather than a skipped check. Blocking (file reads, decryption)."""
    report = Report()
    check_keys(config, report, in_service)
    check_registry_keys(config, report, in_service)
    check_models(config, list(config.models if models is None else models), report)
    check_tls(config, report)
    check_access(config, report, in_service)
    return report


# -- keys -----------------------------------------------------------------------------------------------------


def _needs_credentials(source: KeySource) -> bool:
    return source.credential is not None and not os.environ.get("CREDENTIALS_DIRECTORY")


def _skip_reason(source: KeySource) -> str:
    return (f"credential {source.credential!r} needs the service's credentials ($CREDENTIALS_DIRECTORY is not set): "
            "the unit's ExecStartPre checks it; by hand, give the key with 'path' or run under "
            "systemd-run -p LoadCredential=...")


def did_you_mean(path: Path) -> str:
    """For a path that does not exist: the closest sibling name, or which folder is missing."""
    parent = path.parent
    try:
        siblings = [p.name for p in parent.iterdir()]
    except FileNotFoundError:
        return f" (the folder {parent} does not exist)"
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.6)
    return f" (did you mean {str(parent / close[0])!r}?)" if close else ""


def _key_problem(exc: InferdError, source: KeySource) -> str:
    text = str(exc)
    try:
        path = keys.source_path(source)
    except InferdError:
        return text
    if not os.path.lexists(path):
        text += did_you_mean(path)
    return text


def check_keys(config: Config, report: Report, in_service: bool = False) -> None:
    """Read every KEK (mode and format, through :mod:`daemon.keys` as serve does), every signer, and the MQTT
    password when MQTT is on; the ones that load go into the report for the model checks."""
    for i, source in enumerate(config.keys.kek):
        where = f"keys.kek[{i}]"
        if _needs_credentials(source) and not in_service:
            report.add(where, "skipped", _skip_reason(source))
            continue
        try:
            kek = keys.load_kek(source)
        except InferdError as exc:
            report.add(where, "failed", _key_problem(exc, source))
            continue
        if kek.key_id in report.keks:
            report.add(where, "failed", f"two configured KEKs share the key id {kek.key_id!r}")
            continue
        report.keks[kek.key_id] = kek
        report.add(where, "ok", f"{keys.source_path(source)}: KEK {kek.key_id!r}, mode 0600 or stricter")
    for i, source in enumerate(config.keys.signers):
        where = f"keys.signers[{i}]"
        if _needs_credentials(source) and not in_service:
            report.add(where, "skipped", _skip_reason(source))
            continue
        try:
            public = keys.load_public_key(source)
        except InferdError as exc:
            report.add(where, "failed", _key_problem(exc, source))
            continue
        sid = keys.signer_id(public)
        report.signers[sid] = public
        report.add(where, "ok", f"{keys.source_path(source)}: Ed25519 public key, signer id {sid}")
    password = config.mqtt.password
    if config.mqtt.enabled and password is not None:
        if _needs_credentials(password) and not in_service:
            report.add("mqtt.password", "skipped", _skip_reason(password))
            return
        try:
            raw = keys.read_secret_file(keys.source_path(password))
            raw.decode("utf-8")
        except InferdError as exc:
            report.add("mqtt.password", "failed", _key_problem(exc, password))
        except UnicodeDecodeError:
            report.add("mqtt.password", "failed", "the MQTT password file is not UTF-8 text")
        else:
            report.add("mqtt.password", "ok", "readable, mode 0600 or stricter")


def check_registry_keys(config: Config, report: Report, in_service: bool = False) -> None:
    """The registry's index keys, as its client reads them at start-up (docs/registry.md)."""
    for i, source in enumerate(config.registry.index_keys if config.registry.url is not None else ()):
        where = f"registry.index_keys[{i}]"
        if _needs_credentials(source) and not in_service:
            report.add(where, "skipped", _skip_reason(source))
            continue
        try:
            public = keys.load_public_key(source)
        except InferdError as exc:
            report.add(where, "failed", _key_problem(exc, source))
            continue
        report.add(where, "ok", f"{keys.source_path(source)}: Ed25519 public key, index key id "
                   f"{keys.signer_id(public)}")


# -- model versions -------------------------------------------------------------------------------------------


def open_version(store: Store, cfg: ModelConfig, version: str, keks: Mapping[str, keys.Kek],
                 signers: Mapping[str, Ed25519PublicKey], require_signature: bool) -> OpenedArtifact:
    """Read one installed version, verify its signature and decrypt it in memory, and check it is the artifact the
    config means (name, version, runtime): the model manager's load and check-config both start here."""
    opened = open_artifact(store.read_artifact(cfg.name, version), keks, signers,
                           require_signature=require_signature)
    header = opened.header
    if header.name != cfg.name or header.version != version:
        raise ArtifactMismatch(f"store entry {cfg.name}:{version} holds an artifact for {header.name}:{header.version}")
    if header.runtime != cfg.runtime:
        raise ArtifactMismatch(
            f"model {cfg.name} is configured for runtime {cfg.runtime} but its artifact was packed for {header.runtime}"
        )
    return opened


def wanted_version(store: Store, cfg: ModelConfig) -> tuple[str, str]:
    """(the version serve would load, why: pinned or active); raises ModelNotFound when there is none."""
    if cfg.version is not None:
        return cfg.version, "pinned"
    active = store.state(cfg.name).active
    if active is None:
        raise ModelNotFound(f"model {cfg.name!r} has no active version in the store (install one with "
                            "'inferd model install')")
    return active, "active"


def check_models(config: Config, models: list[ModelConfig], report: Report) -> None:
    """Each model's version (pinned, else the store's active one) is installed, verifies and decrypts with the keys
    that loaded. Skipped when a KEK or signer could not be read for want of credentials."""
    store = Store(config.state_dir)
    index = {m.name: i for i, m in enumerate(config.models)}
    waiting = [f for f in report.of("skipped") if f.check.startswith(("keys.kek", "keys.signers"))]
    for cfg in models:
        where = f"models[{index.get(cfg.name, '?')}] ({cfg.name})"
        try:
            version, why = wanted_version(store, cfg)
        except InferdError as exc:
            report.add(where, "failed", str(exc))
            continue
        if not store.artifact_path(cfg.name, version).is_file():
            installed = store.versions(cfg.name)
            report.add(where, "failed", f"{why} version {version!r} is not installed in {store.models_dir} "
                       f"(installed: {', '.join(installed) or 'none'})")
            continue
        if waiting:
            report.add(where, "skipped", f"{why} version {version!r} is installed; verifying it needs the keys "
                       f"of {', '.join(f.check for f in waiting)}")
            continue
        try:
            opened = open_version(store, cfg, version, report.keks, report.signers,
                                  config.keys.require_signature)
        except InferdError as exc:
            report.add(where, "failed", f"{why} version {version!r}: {exc}")
            continue
        h = opened.header
        signed = f"signed by {h.signer}" if h.signer else "unsigned"
        report.add(where, "ok", f"{why} version {version!r} installed, {signed}, decrypts with KEK {h.kek_id!r}")


# -- listener TLS ---------------------------------------------------------------------------------------------


def _tls_files(config: Config) -> list[tuple[str, Path | None, Path | None, Path | None]]:
    """(section, cert, key, CA) for each TLS setting serve would read."""
    out: list[tuple[str, Path | None, Path | None, Path | None]] = []
    if config.grpc.enabled and config.grpc.tls.enabled:
        t = config.grpc.tls
        out.append(("grpc.tls", t.cert_file, t.key_file, t.client_ca_file))
    if config.mqtt.enabled and config.mqtt.tls.enabled:
        m = config.mqtt.tls
        out.append(("mqtt.tls", m.cert_file, m.key_file, m.ca_file))
    return out


def check_tls(config: Config, report: Report) -> None:
    """The certificate and key parse and belong together, the CA file parses: what the TLS libraries refuse."""
    for section, cert, key, ca in _tls_files(config):
        missing = [(n, p) for n, p in (("cert_file", cert), ("key_file", key), ("ca_file", ca))
                   if p is not None and not p.exists()]
        for name, path in missing:
            report.add(f"{section}.{name}", "failed", f"{path} does not exist{did_you_mean(path)}")
        if missing:
            continue
        if section == "grpc.tls" and key is not None:
            try:
                keys.read_secret_file(key)  # serve refuses a gRPC key group or others may read, like a KEK
            except InferdError as exc:
                report.add(f"{section}.key_file", "failed", str(exc))
                continue
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if cert is not None and key is not None:
            try:
                context.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                report.add(f"{section}.cert_file", "failed", f"{cert} with {key}: {_ssl_reason(exc)}")
                continue
            report.add(f"{section}.cert_file", "ok", f"{cert}: certificate and key {key} load and match")
        if ca is not None:
            try:
                context.load_verify_locations(cafile=ca)
            except (OSError, ssl.SSLError) as exc:
                report.add(f"{section}.ca", "failed", f"{ca}: {_ssl_reason(exc)}")
                continue
            report.add(f"{section}.ca", "ok", f"{ca}: CA certificate(s) load")


def _ssl_reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"{exc.reason or exc}".lower().replace("_", " ")
    return exc.strerror or str(exc)


# -- HTTPS and authentication ---------------------------------------------------------------------------------


def check_access(config: Config, report: Report, in_service: bool = False) -> None:
    """The HTTPS listener's files and the API keys, each built by the very code serve builds them with
    (:mod:`daemon.tls_server`, :func:`daemon.access.build_guard`, which also refuses a listener beyond loopback
    with no way to authenticate)."""
    from daemon import access, tls_server  # only here: check-config's other checks do not need them

    tls = config.server.tls
    if tls.enabled and tls.key is not None:
        credential = next((c for c in (tls.key, tls.cert) if c is not None and _needs_credentials(c)), None)
        if credential is not None and not in_service:
            report.add("server.tls", "skipped", _skip_reason(credential))
        else:
            try:
                served = tls_server.server_tls(tls)
            except InferdError as exc:
                report.add("server.tls", "failed", _key_problem(exc, tls.key).removeprefix("server.tls: "))
            else:
                where = served.cert_file if served is not None else tls.cert_file
                report.add("server.tls", "ok", f"{where}: certificate and key load and match")
    auth = config.auth
    if auth.keys_file is not None and _needs_credentials(auth.keys_file) and not in_service:
        report.add("auth", "skipped", _skip_reason(auth.keys_file))
        return
    try:
        guard = access.build_guard(config)
    except InferdError as exc:
        source = auth.keys_file
        report.add("auth", "failed", _key_problem(exc, source) if source is not None else str(exc))
        return
    what = "required" if guard.required else "not required (every listener on loopback, or auth.required: false)"
    keys_file = f", keys file {keys.source_path(auth.keys_file)} readable (0600)" if auth.keys_file else ""
    report.add("auth", "ok", f"authentication {what}; {len(auth.keys)} inline key(s), "
               f"{len(auth.certificates)} certificate caller(s){keys_file}")

