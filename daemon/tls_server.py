"""The HTTPS listener's TLS context: TLS 1.2 at least, modern ciphers only, optional client certificates (mTLS),
and certificates re-read on SIGHUP into the live context, so new handshakes use them and open connections stay."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

from daemon.config_security import HttpTlsConfig
from daemon.errors import ConfigError
from daemon.keys import read_secret_file, source_path

#: TLS 1.2 suites with forward secrecy and AEAD only (TLS 1.3's own suites are all of that kind already)
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class ServerTls:
    """The files of ``server.tls`` and the one context the listener serves with."""

    def __init__(self, config: HttpTlsConfig) -> None:
        if config.cert_file is None or config.key is None:
            raise ConfigError("server.tls needs both 'cert_file' and 'key'")
        self.config = config
        self.cert_file: Path = config.cert_file
        self.key_file = source_path(config.key)
        self.context = self._build()
        self._fingerprint = self._read_fingerprint()
        self._pending = self._fingerprint

    def _read_fingerprint(self) -> str:
        digest = hashlib.sha256()
        for path in (self.cert_file, self.config.client_ca_file):
            if path is not None:
                digest.update(path.read_bytes())
        digest.update(read_secret_file(self.key_file))  # also refuses a key readable by group or others
        return digest.hexdigest()

    def _build(self) -> ssl.SSLContext:
        read_secret_file(self.key_file)  # the permission check, with its precise error, before OpenSSL reads it
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if self.config.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(CIPHERS)
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
            if self.config.client_ca_file is not None:
                ctx.load_verify_locations(cafile=self.config.client_ca_file)
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"server.tls: cannot use {self.cert_file} / {self.key_file}: {exc}") from None
        return ctx

    def reload(self) -> bool:
        """Check the files again (blocking); True when they changed and a fresh context loads them. The caller then
        runs :meth:`apply` on the loop."""
        fingerprint = self._read_fingerprint()
        if fingerprint == self._fingerprint:
            return False
        self._build()  # a certificate that does not load (or match its key) is refused before anything changes
        self._pending = fingerprint
        return True

    def apply(self) -> str:
        """Load the new files into the live context: handshakes from now on use them; open connections keep theirs."""
        self.context.load_cert_chain(self.cert_file, self.key_file)
        if self.config.client_ca_file is not None:
            self.context.load_verify_locations(cafile=self.config.client_ca_file)
        self._fingerprint = self._pending
        return f"HTTPS certificate re-read from {self.cert_file}"


def server_tls(config: HttpTlsConfig) -> ServerTls | None:
    return ServerTls(config) if config.enabled else None


__all__ = ["CIPHERS", "ServerTls", "server_tls"]
