"""The HTTPS listener's TLS context: TLS 1.2 at least, modern ciphers only, optional client certificates (mTLS),
and certificates re-read on SIGHUP without dropping a connection.

A listening socket keeps the context it was bound with, so the listener's context is only a switchboard: its
``sni_callback`` (which OpenSSL calls for every ClientHello, with or without a server name) hands each handshake
the context in force. A reload builds a complete new context from the files, off the loop, and switching is one
assignment: new handshakes get the new certificate and the new client CA (an old CA is no longer trusted), open
connections keep what they negotiated, and nothing a reload checked can differ from what then serves."""

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
        if config.key is None:
            raise ConfigError("server.tls needs a certificate ('cert_file' or 'cert') and a 'key'")
        if config.cert_file is not None:
            self.cert_file: Path = config.cert_file
        elif config.cert is not None:
            self.cert_file = source_path(config.cert)  # $CREDENTIALS_DIRECTORY/<name> under systemd
        else:
            raise ConfigError("server.tls needs a certificate ('cert_file' or 'cert') and a 'key'")
        self.config = config
        self.key_file = source_path(config.key)
        self.context = self._build()  # the listener's; hands each handshake ``current`` (see the module docstring)
        self.current = self.context
        self.context.sni_callback = self._pick
        self._fingerprint = self._read_fingerprint()
        self._pending: tuple[str, ssl.SSLContext] | None = None

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
        # No session tickets (TLS 1.3 resumes only through them): a ticket from before a reload would let a client
        # certificate signed by a CA the reload removed back in. TLS 1.2 session-id resumption is refused per
        # connection instead (daemon/http_limits.py), since Python cannot turn the server's session cache off.
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
            if self.config.client_ca_file is not None:
                ctx.load_verify_locations(cafile=self.config.client_ca_file)
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"server.tls: cannot use {self.cert_file} / {self.key_file}: {exc}") from None
        return ctx

    def _pick(self, sslobj: ssl.SSLObject, server_name: str | None, listening: ssl.SSLContext) -> None:
        current = self.current
        if current is not listening:
            sslobj.context = current

    def reload(self) -> bool:
        """Read the files again and build their context (blocking: an executor); True when they changed. A
        certificate that does not load, or does not match its key, raises before anything changes. The caller
        then runs :meth:`apply` on the loop."""
        fingerprint = self._read_fingerprint()
        if fingerprint == self._fingerprint:
            return False
        self._pending = (fingerprint, self._build())
        return True

    def apply(self) -> str:
        """Switch new handshakes to the context :meth:`reload` built (one assignment: it cannot fail)."""
        if self._pending is None:
            return "HTTPS certificate unchanged"
        (self._fingerprint, self.current), self._pending = self._pending, None
        return f"HTTPS certificate re-read from {self.cert_file}"


def server_tls(config: HttpTlsConfig) -> ServerTls | None:
    return ServerTls(config) if config.enabled else None


__all__ = ["CIPHERS", "ServerTls", "server_tls"]
