"""TLS server contexts, built from a listener's `tls_*` keys when the configuration is loaded.

The master builds them (config_sections.ListenerOptions validates by building), so a missing or
unreadable file, a key that does not match its certificate or a bad CA bundle is a configuration error
at start, in check-config and on a reload, which then keeps the old configuration. Workers get the
built contexts at fork (supervisor.py) and never read a key file themselves; a reload reads the files
again, so a renewed certificate reaches the new workers while the old ones keep theirs.
"""

from __future__ import annotations

import ssl

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsConfigError(ValueError):
    """A TLS file cannot be used; str() names the key and the file."""


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key, from a daemon.
    raise TlsConfigError("the key is encrypted; echod needs an unencrypted key (file mode 0600)")


def check_readable(key: str, path: str) -> None:
    """Fail early, naming the key, for a file that is missing or unreadable."""
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise TlsConfigError(f"{key} {path!r}: cannot read: {exc.strerror or exc}") from None


def build_context(cert: str, key: str, client_ca: str, min_version: str) -> ssl.SSLContext:
    """A server context for one listener; raises TlsConfigError naming the key and file at fault."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[min_version]
    # Client-initiated renegotiation (TLS 1.2) lets one client make a worker do handshakes in a loop;
    # a TCP FIN at a record boundary counts as a clean close (worker/tls.py checks for truncation).
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_IGNORE_UNEXPECTED_EOF
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        check_readable(name, path)
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except TlsConfigError as exc:
        raise TlsConfigError(f"tls_key {key!r}: {exc}") from None
    except ssl.SSLError as exc:
        what = "does not match tls_cert" if "MISMATCH" in str(exc) else f"unusable ({exc.reason or exc})"
        raise TlsConfigError(f"tls_key {key!r} / tls_cert {cert!r}: {what}") from None
    if client_ca:
        check_readable("tls_client_ca", client_ca)
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise TlsConfigError(f"tls_client_ca {client_ca!r}: not a PEM CA bundle ({exc.reason})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
