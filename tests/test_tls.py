"""TLS listeners (issue 17), against the real daemon with Python's ssl, openssl s_client and HAProxy.

The test PKI is made here with Debian's `openssl` (EC P-256: quick handshakes), in a temporary
directory: no private key is committed. `Pki.issue` makes server certificates with a chosen serial, so
the reload test can tell the renewed certificate from the old one.
"""

from __future__ import annotations

import json
import os
import random
import resource
import select
import selectors
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    ECHOD,
    Daemon,
    DaemonFactory,
    free_port,
    kill_group,
    one_worker,
    recv_exactly,
    start_haproxy,
    wait_for,
    wait_metrics,
)
from echod.tls_config import TlsConfigError, build_context
from echod.worker.core import Core
from echod.worker.output import Watermarks
from echod.worker.peers import Peers
from echod.worker.tls import Tls, TlsConn

IO_TIMEOUT = 10.0
OK = 'echod_tls_handshakes_total{result="success"}'
FAILED = 'echod_tls_handshakes_total{result="failure"}'
CLOSED_TLS = 'echod_connections_closed_total{reason="tls"}'
CLOSED_CLIENT = 'echod_connections_closed_total{reason="client"}'
TLS_ACTIVE = "echod_tls_connections_active"
ACTIVE = "echod_connections_active"


# -- the test PKI ------------------------------------------------------------------------------------------
class Pki:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca_key, self.ca = self._ca("echod-test-ca")
        self.other_ca_key, self.other_ca = self._ca("some-other-ca")
        self.cert, self.key = self.issue("server", 1001)
        self.client_cert, self.client_key = self.issue("client", 2001, client=True)
        self.rogue_cert, self.rogue_key = self.issue("rogue", 3001, client=True, by_other=True)

    def _run(self, *args: str) -> None:
        subprocess.run(["openssl", *args], cwd=self.root, check=True, capture_output=True, timeout=30)

    def _ca(self, name: str) -> tuple[Path, Path]:
        self._run(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
        )  # fmt: skip
        return self.root / f"{name}.key", self.root / f"{name}.pem"

    def issue(
        self, name: str, serial: int, client: bool = False, by_other: bool = False
    ) -> tuple[Path, Path]:
        """A certificate for 127.0.0.1 (or a client) signed by the test CA; returns (cert, key)."""
        ca, ca_key = (self.other_ca, self.other_ca_key) if by_other else (self.ca, self.ca_key)
        ext = self.root / f"{name}.ext"
        ext.write_text("extendedKeyUsage=clientAuth\n" if client else "subjectAltName=IP:127.0.0.1\n")
        self._run(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        )  # fmt: skip
        self._run(
            "x509", "-req", "-in", f"{name}.csr", "-CA", str(ca), "-CAkey", str(ca_key),
            "-set_serial", str(serial), "-days", "2", "-out", f"{name}.pem", "-extfile", str(ext),
        )  # fmt: skip
        return self.root / f"{name}.pem", self.root / f"{name}.key"

    def client_context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key))
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def tls_options(pki: Pki, **extra: object) -> dict[str, object]:
    return {"tls_cert": str(pki.cert), "tls_key": str(pki.key), **extra}


def tls_daemon(echod: DaemonFactory, listeners: list[dict[str, object]], *extra: str, **kw: object) -> Daemon:
    """A daemon whose listen addresses have these listener options, in order."""
    listen = [f"127.0.0.1:{free_port()}" for _ in listeners]
    table = json.dumps(dict(zip(listen, listeners, strict=True)))
    return echod("--listeners", table, *extra, listen=listen, **kw)


def connect(daemon: Daemon, ctx: ssl.SSLContext, index: int = 0) -> ssl.SSLSocket:
    raw = daemon.connect(index, timeout=IO_TIMEOUT)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class MemoryClient:
    """A TLS client over an SSLObject, so that it can half-close: close_notify and FIN at will."""

    def __init__(self, daemon: Daemon, ctx: ssl.SSLContext) -> None:
        self.sock = daemon.connect(timeout=IO_TIMEOUT)
        self.inbio, self.outbio = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inbio, self.outbio, server_hostname="127.0.0.1")
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._pump()
        self._pump(read=False)

    def _pump(self, read: bool = True) -> bool:
        if self.outbio.pending:
            self.sock.sendall(self.outbio.read())
        if not read:
            return True
        data = self.sock.recv(65536)
        if data:
            self.inbio.write(data)
        else:
            self.inbio.write_eof()
        return bool(data)

    def send(self, data: bytes) -> None:
        self.obj.write(data)
        self._pump(read=False)

    def records(self, data: bytes) -> bytes:
        """The ciphertext of `data`, not sent."""
        self.obj.write(data)
        return self.outbio.read()

    def read_all(self) -> tuple[bytes, bool]:
        """Everything until the server's close; True if that close came with a close_notify."""
        got = bytearray()
        while True:
            try:
                chunk = self.obj.read(65536)
            except ssl.SSLWantReadError:
                if not self._pump():
                    try:
                        self.obj.read(1)
                    except ssl.SSLError:
                        return bytes(got), False
                continue
            except ssl.SSLZeroReturnError:  # the server's close_notify, once ours is sent
                return bytes(got), True
            except ssl.SSLEOFError:
                return bytes(got), False
            if not chunk:
                return bytes(got), True
            got += chunk


class Duplex:
    """A TLS client on a connected socket: handshake at once; then send and read in the same loop."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.inbio, self.outbio = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inbio, self.outbio, server_hostname="127.0.0.1")
        self.wire = bytearray()  # ciphertext the kernel has not taken yet
        self.got = bytearray()  # plaintext echoed back
        self.eof = False
        try:
            self._handshake()
        except BaseException:
            sock.close()
            raise

    def _handshake(self) -> None:
        deadline = time.monotonic() + IO_TIMEOUT
        while True:  # a refused connection raises here (ssl.SSLError or ConnectionError): never a timeout
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if self.eof:
                    raise ConnectionError("closed during the handshake") from None
                if time.monotonic() > deadline:
                    raise AssertionError("the TLS handshake neither finished nor failed in time") from None
                self.pump(0.1)
        self.pump(0)  # our Finished

    def pump(self, wait: float, read: bool = True) -> int:
        """Send what is pending and take in what came, waiting up to `wait` s for either; bytes moved."""
        self.wire += self.outbio.read()
        readable, writable, _ = select.select([self.sock] if read else [], [self.sock] if self.wire else [],
                                              [], wait)  # fmt: skip
        moved = 0
        if writable:
            try:
                moved = self.sock.send(self.wire)
            except BlockingIOError:
                moved = 0
            del self.wire[:moved]
        if readable and not self.eof:
            data = self.sock.recv(1 << 20)
            if data:
                self.inbio.write(data)
                moved += len(data)
            else:
                self.eof = True
                self.inbio.write_eof()
        return moved

    def decrypt(self) -> None:
        while True:
            try:
                chunk = self.obj.read(1 << 20)
            except (ssl.SSLWantReadError, ssl.SSLEOFError):
                return
            if not chunk:
                return
            self.got += chunk

    def send(self, data: bytes) -> None:
        self.obj.write(data)  # into the memory BIO, whole; pump() sends it

    def wait_echo(self, size: int, timeout: float = IO_TIMEOUT) -> bytes:
        """Pump until `size` bytes have come back (or the deadline, or EOF); returns and consumes them."""
        deadline = time.monotonic() + timeout
        while len(self.got) < size and not self.eof and time.monotonic() < deadline:
            self.pump(0.05)
            self.decrypt()
        data = bytes(self.got[:size])
        del self.got[:size]
        return data

    def echo(self, payload: bytes) -> bytes:
        self.send(payload)
        return self.wait_echo(len(payload))

    def close(self) -> None:
        self.sock.close()


# -- unit: contexts and record framing (fast) ----------------------------------------------------------
def test_build_context_names_the_key_and_file(pki: Pki, tmp_path: Path) -> None:
    assert (
        build_context(str(pki.cert), str(pki.key), str(pki.ca), "1.3").minimum_version
        == ssl.TLSVersion.TLSv1_3
    )
    with pytest.raises(TlsConfigError, match=r"tls_key '.*/missing.pem': cannot read"):
        build_context(str(pki.cert), str(tmp_path / "missing.pem"), "", "1.2")
    with pytest.raises(TlsConfigError, match=r"tls_key .* does not match tls_cert"):
        build_context(str(pki.cert), str(pki.client_key), "", "1.2")
    with pytest.raises(TlsConfigError, match=r"tls_client_ca '.*server.key': not a PEM CA bundle"):
        build_context(str(pki.cert), str(pki.key), str(pki.key), "1.2")
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(pki.key), "-aes256", "-passout", "pass:secret",
         "-out", str(encrypted)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    with pytest.raises(TlsConfigError, match="encrypted"):
        build_context(str(pki.cert), str(encrypted), "", "1.2")


def test_record_framing_tells_a_boundary_from_a_truncated_record(pki: Pki) -> None:
    rng = random.Random(17)
    # A real TlsConn (a compiled build's classes cannot be made with __new__ alone), never on a socket.
    tls = Tls(Core(select.epoll(), 65536, 0, Peers(0)), Watermarks(2, 1), 10.0)
    conn = TlsConn(tls, build_context(str(pki.cert), str(pki.key), "", "1.2"), 0.0)
    for _ in range(200):
        bodies = [rng.randbytes(rng.randrange(0, 3000)) for _ in range(rng.randrange(1, 6))]
        records = [bytes([23, 3, 3]) + len(body).to_bytes(2, "big") + body for body in bodies]
        stream = b"".join(records)
        cut = rng.randrange(0, len(stream) + 1)
        conn.need, conn.head = 0, b""
        pos = 0
        while pos < cut:  # arbitrary read sizes, headers split across reads included
            step = min(cut - pos, rng.choice([1, 2, 4, 5, 7, 100, 5000]))
            Tls._frame(conn, stream[pos : pos + step])
            pos += step
        boundaries = {0, *(sum(map(len, records[: i + 1])) for i in range(len(records)))}
        assert (conn.need == 0 and conn.head == b"") == (cut in boundaries), (cut, boundaries)


# -- live ---------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_echo_1b_1mib_16mib_slow_reader_bounded_and_copied_in_splice_mode(
    echod: DaemonFactory, pki: Pki
) -> None:
    """io_mode splice would splice every plain connection: TLS ones fall back to the copy path."""
    high, read_size = 65536, 65536
    daemon = tls_daemon(
        echod, [tls_options(pki)], "--io-mode", "splice", "--write-buffer-high", str(high),
        "--write-buffer-low", "16384", "--read-size", str(read_size), workers=1,
    )  # fmt: skip
    # One thread sends and reads (Duplex): OpenSSL forbids SSL_read and SSL_write on one SSL object
    # from two threads at once, and a `sendall` thread beside the reading one stalled this test for
    # its whole 10 s recv timeout in 1 of 16 runs on a loaded machine.
    with daemon.connect(timeout=IO_TIMEOUT) as raw:
        one = Duplex(raw, pki.client_context())
        assert one.echo(b"x") == b"x"
        metrics = wait_metrics(daemon, lambda m: m[TLS_ACTIVE] == 1 and m[ACTIVE] == 1, "one TLS connection")
        assert metrics[OK] == 1
        for size in (1 << 20, 16 << 20):
            payload = random.Random(size).randbytes(size)
            one.send(payload)  # all of it into the memory BIO: pump() sends it as the kernel takes it
            peak, rest_at = 0.0, 1 << 20
            deadline = time.monotonic() + 120
            while len(one.got) < size and not one.eof and time.monotonic() < deadline:
                one.pump(0.05)
                one.decrypt()
                if len(one.got) >= rest_at:  # a slow reader: stops reading a while, sending on
                    rest_at += 1 << 20
                    rest_until = time.monotonic() + 0.3
                    while time.monotonic() < rest_until:
                        one.pump(0.05, read=False)
                    peak = max(peak, daemon.metrics()["echod_buffered_bytes"])
            got = bytes(one.got[:size])
            del one.got[:size]
            assert got == payload, f"{size} bytes: echo differs ({len(got)} came back)"
            # Pending ciphertext stays within the high watermark plus what one read adds (and TLS framing).
            assert peak <= high + read_size + 4096, peak
    metrics = wait_metrics(daemon, lambda m: m[ACTIVE] == 0 and m[TLS_ACTIVE] == 0, "the connection closed")
    assert metrics["echod_backpressure_pauses_total"] > 0, "the slow reader never made echod stop reading"
    assert metrics[CLOSED_TLS] == 0 and metrics[FAILED] == 0
    assert metrics["echod_received_bytes_total"] == 1 + (1 << 20) + (16 << 20)


@pytest.mark.integration
def test_half_close_truncated_record_idle_timeout(echod: DaemonFactory, pki: Pki) -> None:
    daemon = tls_daemon(echod, [tls_options(pki)], "--idle-timeout", "2", workers=1)
    ctx = pki.client_context()
    payload = random.Random(3).randbytes(300_000)
    # close_notify, then FIN: everything echoed, then the server's close_notify.
    client = MemoryClient(daemon, ctx)
    client.send(payload)
    try:
        client.obj.unwrap()
    except ssl.SSLWantReadError:
        pass
    client._pump(read=False)
    client.sock.shutdown(socket.SHUT_WR)
    assert client.read_all() == (payload, True)
    client.sock.close()
    # A FIN at a record boundary, without close_notify: a half-close too.
    client = MemoryClient(daemon, ctx)
    client.send(b"fin only")
    client.sock.shutdown(socket.SHUT_WR)
    assert client.read_all() == (b"fin only", True)
    client.sock.close()
    wait_metrics(daemon, lambda m: m[CLOSED_CLIENT] == 2 and m[ACTIVE] == 0, "two half-closes")
    # A FIN in the middle of a record: the TLS stream is broken.
    client = MemoryClient(daemon, ctx)
    records = client.records(b"never whole")
    client.sock.sendall(records[:-4])
    client.sock.shutdown(socket.SHUT_WR)
    assert client.read_all() == (b"", False)  # no echo, no close_notify
    client.sock.close()
    wait_metrics(daemon, lambda m: m[CLOSED_TLS] == 1 and m[FAILED] == 0, "the truncated record")
    wait_for(lambda: "truncated record" in daemon.log(), 5, "the reason in the log")
    # An established TLS connection that goes quiet is closed by idle_timeout like any other.
    with connect(daemon, ctx) as quiet:
        quiet.settimeout(IO_TIMEOUT)
        started = time.monotonic()
        assert quiet.recv(10) == b""
        assert 1.5 < time.monotonic() - started < 6
    wait_metrics(daemon, lambda m: m['echod_connections_closed_total{reason="timeout"}'] == 1, "idle timeout")


@pytest.mark.integration
def test_a_thousand_handshakes_at_once(echod: DaemonFactory, pki: Pki) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    daemon = tls_daemon(echod, [tls_options(pki)], "--backlog", "2048", workers=2)
    ctx = pki.client_context()
    count = 1000
    sel = selectors.DefaultSelector()
    socks: list[ssl.SSLSocket] = []
    try:
        for _ in range(count):
            raw = socket.socket()
            raw.setblocking(False)
            raw.connect_ex(("127.0.0.1", daemon.port))
            sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1", do_handshake_on_connect=False)
            socks.append(sock)
            sel.register(sock, selectors.EVENT_WRITE)
        pending, deadline = set(socks), time.monotonic() + 90
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(1.0):
                sock = key.fileobj
                assert isinstance(sock, ssl.SSLSocket)
                try:
                    sock.do_handshake()
                except ssl.SSLWantReadError:
                    sel.modify(sock, selectors.EVENT_READ)
                    continue
                except ssl.SSLWantWriteError:
                    sel.modify(sock, selectors.EVENT_WRITE)
                    continue
                sel.unregister(sock)
                pending.discard(sock)
        assert not pending, f"{len(pending)} handshakes did not complete"
        for i, sock in enumerate(socks):
            sock.setblocking(True)
            sock.settimeout(IO_TIMEOUT)
            sock.sendall(b"%d\n" % i)
        for i, sock in enumerate(socks):
            assert recv_exactly(sock, len(b"%d\n" % i)) == b"%d\n" % i
        metrics = wait_metrics(daemon, lambda m: m[TLS_ACTIVE] == m[OK] == count, f"{count} TLS connections")
        assert metrics[FAILED] == 0
    finally:
        for sock in socks:
            sock.close()
    wait_metrics(daemon, lambda m: m[ACTIVE] == 0, "all closed", timeout=20)


@pytest.mark.integration
def test_mutual_tls_and_minimum_version(echod: DaemonFactory, pki: Pki) -> None:
    daemon = tls_daemon(
        echod,
        [tls_options(pki, tls_client_ca=str(pki.ca)), tls_options(pki, tls_min_version="1.3")],
        workers=1,
    )
    # Mutual TLS: a certificate from the CA is accepted...
    with connect(daemon, pki.client_context(pki.client_cert, pki.client_key)) as ok:
        ok.settimeout(IO_TIMEOUT)
        ok.sendall(b"with a certificate")
        assert recv_exactly(ok, 18) == b"with a certificate"
    # ...none, or one from another CA, is refused (with TLS 1.3 the client learns it on its first read).
    for cert, key in ((None, None), (pki.rogue_cert, pki.rogue_key)):
        with (
            pytest.raises((ssl.SSLError, ConnectionError)),
            connect(daemon, pki.client_context(cert, key)) as refused,
        ):
            refused.settimeout(IO_TIMEOUT)
            refused.sendall(b"let me in")
            assert refused.recv(100) == b""  # closed without an echo counts as refused too
            raise ConnectionError("closed")
    # tls_min_version 1.3: a TLS 1.2 client is refused, a 1.3 client served.
    old = pki.client_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError, match=r"(?i)protocol version|unsupported protocol"):
        connect(daemon, old, index=1)
    with connect(daemon, pki.client_context(), index=1) as new:
        assert new.version() == "TLSv1.3"
    metrics = wait_metrics(daemon, lambda m: m[FAILED] == 3 and m[ACTIVE] == 0, "three refused handshakes")
    assert metrics[OK] == 2 and metrics[CLOSED_TLS] == 3
    log = daemon.log()
    assert "peer did not return a certificate" in log or "certificate required" in log, log[-2000:]
    assert "unsupported protocol" in log, log[-2000:]


@pytest.mark.integration
def test_plain_text_and_a_stalled_handshake_cost_nothing(echod: DaemonFactory, pki: Pki) -> None:
    daemon = tls_daemon(echod, [tls_options(pki)], "--tls-handshake-timeout", "1", workers=1)
    worker = one_worker(daemon)
    with daemon.connect(timeout=IO_TIMEOUT) as plain:
        plain.sendall(b"GET / HTTP/1.0\r\n\r\nhello\n")
        with pytest.raises(ConnectionResetError):
            while plain.recv(100):  # at most an alert, never an echo
                pass
            raise ConnectionResetError
    stalled = [daemon.connect(timeout=IO_TIMEOUT) for _ in range(20)]
    stalled[0].sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, never finished
    before, started = cpu_seconds(worker), time.monotonic()
    for sock in stalled:
        assert sock.recv(100) == b""  # closed by tls_handshake_timeout
        sock.close()
    waited = time.monotonic() - started
    assert 0.5 < waited < 5, waited
    assert cpu_seconds(worker) - before < 0.2, "a stalled handshake costs CPU"
    metrics = wait_metrics(daemon, lambda m: m[FAILED] == 21, "21 failed handshakes")
    assert metrics[CLOSED_TLS] == 21 and metrics[OK] == 0
    assert len(daemon.workers()) == 1 and daemon.workers()[0] == worker, "a worker restarted"
    wait_for(lambda: "20 handshake timed out" in daemon.log(), 5, "one line for the 20 timeouts")
    assert "http request" in daemon.log()


def write_config(path: Path, address: str, pki: Pki, cert: Path, key: Path) -> None:
    table = f'[listeners."{address}"]\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
    path.write_text(f'listen = ["{address}"]\nworkers = 1\n{table}')


@pytest.mark.integration
def test_reload_renews_the_certificate_and_open_connections_keep_echoing(
    echod: DaemonFactory, pki: Pki, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(pki.cert.read_bytes())
    key.write_bytes(pki.key.read_bytes())
    config = tmp_path / "echod.toml"
    write_config(config, address, pki, cert, key)
    daemon = echod("--config", str(config), listen=[address], workers=1)
    ctx = pki.client_context()
    with connect(daemon, ctx) as old:
        old.settimeout(IO_TIMEOUT)
        assert old.getpeercert()["serialNumber"] == "03E9"  # 1001
        old.sendall(b"before")
        assert recv_exactly(old, 6) == b"before"
        # A key that does not match: the reload fails and the old configuration keeps serving.
        key.write_bytes(pki.client_key.read_bytes())
        daemon.send_signal(signal.SIGHUP)
        wait_metrics(
            daemon, lambda m: m['echod_config_reloads_total{result="failure"}'] == 1, "a failed reload"
        )
        assert "does not match tls_cert" in daemon.log()
        # The renewed certificate: new connections see it, the open one keeps echoing.
        new_cert, new_key = pki.issue("renewed", 1002)
        cert.write_bytes(new_cert.read_bytes())
        key.write_bytes(new_key.read_bytes())
        first = one_worker(daemon)
        daemon.send_signal(signal.SIGHUP)
        wait_metrics(daemon, lambda m: m['echod_config_reloads_total{result="success"}'] == 1, "the reload")
        wait_for(lambda: first not in daemon.workers() or len(daemon.workers()) == 2, 10, "a new worker")

        def serial() -> str:
            with connect(daemon, ctx) as new:
                return str(new.getpeercert()["serialNumber"])

        # The old worker accepts for RETIRE_ACCEPT_GRACE more (worker/lifecycle.py), from the queue it
        # shares with its successor; from then on every new connection gets the renewed certificate.
        wait_for(lambda: serial() == "03EA", 5, "the renewed certificate (serial 1002)")
        assert [serial() for _ in range(5)] == ["03EA"] * 5
        assert first in daemon.workers(), "the old worker left its TLS connection"
        for i in range(3):
            old.sendall(b"after %d" % i)
            assert recv_exactly(old, 7) == b"after %d" % i
        assert old.getpeercert()["serialNumber"] == "03E9"
    wait_for(lambda: first not in daemon.workers(), 15, "the old worker to exit once its connection closed")
    metrics = wait_metrics(daemon, lambda m: m[ACTIVE] == 0, "every connection closed")
    assert metrics["echod_connections_handed_over_total"] == 0 and metrics[CLOSED_TLS] == 0


@pytest.mark.integration
def test_openssl_s_client(echod: DaemonFactory, pki: Pki) -> None:
    daemon = tls_daemon(echod, [tls_options(pki)], workers=1)
    proc = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{daemon.port}", "-CAfile", str(pki.ca),
         "-verify_return_error", "-quiet", "-no_ign_eof"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"hello from s_client\n")
        proc.stdin.flush()
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(IO_TIMEOUT), "no echo from s_client"
        assert proc.stdout.readline() == b"hello from s_client\n"
        proc.stdin.close()
        assert proc.wait(IO_TIMEOUT) == 0
    finally:
        kill_group(proc)
    wait_metrics(daemon, lambda m: m[OK] == 1 and m[ACTIVE] == 0, "s_client's connection closed")


HAPROXY_TLS_CFG = """\
global
    maxconn 256

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend plain
    bind 127.0.0.1:{port}
    default_backend echod-tls

backend echod-tls
    server echod {echod} ssl verify required ca-file {ca} send-proxy-v2
"""


@pytest.fixture
def haproxy_tls(tmp_path: Path) -> Iterator[Callable[[str, Path], int]]:
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(echod_address: str, ca: Path) -> int:
        port = free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(HAPROXY_TLS_CFG.format(port=port, echod=echod_address, ca=ca))
        log_path = tmp_path / "haproxy.log"
        procs.append((start_haproxy(config, log_path), log_path))
        return port

    yield start
    for proc, log_path in procs:
        kill_group(proc)
        print(log_path.read_text(errors="replace"))


@pytest.mark.integration
def test_haproxy_send_proxy_v2_over_tls(
    echod: DaemonFactory, pki: Pki, haproxy_tls: Callable[[str, Path], int]
) -> None:
    daemon = tls_daemon(echod, [tls_options(pki, proxy_protocol=True)], "--log-level", "debug", workers=1)
    port = haproxy_tls(daemon.listen[0], pki.ca)

    def client() -> socket.socket:
        sock = socket.create_connection(
            ("127.0.0.1", port), timeout=IO_TIMEOUT, source_address=("127.0.0.2", 0)
        )
        sock.settimeout(IO_TIMEOUT)
        return sock

    def answers() -> bool:
        try:
            with client() as sock:
                sock.sendall(b"probe\n")
                return recv_exactly(sock, 6) == b"probe\n"
        except ConnectionError:
            return False

    wait_for(answers, 15, "haproxy to answer")
    with client() as sock:
        payload = random.Random(5).randbytes(200_000)
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == payload
        ip, source_port = sock.getsockname()[:2]
        line = f"connection from {ip} port {source_port} (PROXY protocol)"
        wait_for(lambda: line in daemon.log(), 10, f"echod to log {line!r}")
    assert "connection from 127.0.0.1 " not in daemon.log()
    metrics = wait_metrics(daemon, lambda m: m[OK] >= 2 and m[ACTIVE] == 0, "TLS handshakes from HAProxy")
    assert metrics[FAILED] == 0


@pytest.mark.integration
@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"tls_key": "KEY"}, "tls_cert and tls_key go together"),
        (
            {"tls_cert": "CERT", "tls_key": "/nonexistent/key.pem"},
            "tls_key '/nonexistent/key.pem': cannot read",
        ),
        ({"tls_cert": "CERT", "tls_key": "CLIENT_KEY"}, "does not match tls_cert"),
        ({"tls_cert": "CERT", "tls_key": "KEY", "tls_min_version": "1.1"}, "tls_min_version"),
        ({"tls_cert": "CERT", "tls_key": "KEY", "tls_client_ca": "/nonexistent/ca.pem"}, "tls_client_ca"),
    ],
)
def test_check_config_and_run_refuse_bad_tls_files(
    pki: Pki, tmp_path: Path, options: dict[str, str], expected: str
) -> None:
    paths = {"CERT": str(pki.cert), "KEY": str(pki.key), "CLIENT_KEY": str(pki.client_key)}
    options = {k: paths.get(v, v) for k, v in options.items()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHOD_")}
    address = f"127.0.0.1:{free_port()}"
    for command in ("check-config", "run"):
        result = subprocess.run(
            [*ECHOD, command, "--config", "/dev/null", "--listen", address, "--metrics-listen", "",
             "--listeners", json.dumps({address: options})],
            env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 78, (command, result.stdout, result.stderr)
        assert expected in result.stderr and "listeners" in result.stderr, (command, result.stderr)
