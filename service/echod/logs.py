"""Logging: text or JSON lines to stderr or a file; journald priorities; reopen on SIGUSR1."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import sys
import time
from typing import TextIO

# sd-daemon(3) priority prefixes: journald reads "<N>" at the start of a line as the syslog level.
_JOURNAL_PRIORITY = {
    logging.DEBUG: "<7>",
    logging.INFO: "<6>",
    logging.WARNING: "<4>",
    logging.ERROR: "<3>",
    logging.CRITICAL: "<2>",
}


class _TextFormatter(logging.Formatter):
    def __init__(self, journal: bool) -> None:
        fmt = "%(levelname)s %(name)s[%(process)d]: %(message)s"
        if not journal:  # journald stamps lines itself
            fmt = "%(asctime)s " + fmt
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return _JOURNAL_PRIORITY.get(record.levelno, "") + text if self.journal else text


class _JsonFormatter(logging.Formatter):
    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        text = json.dumps(entry, separators=(",", ":"))
        return _JOURNAL_PRIORITY.get(record.levelno, "") + text if self.journal else text


class _ReopenableHandler(logging.StreamHandler[TextIO]):
    """A handler on stderr or on a file that SIGUSR1 reopens (for logrotate)."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(self._open())

    def _open(self) -> TextIO:
        if not self.path:
            return sys.stderr
        return open(self.path, "a", buffering=1, encoding="utf-8")

    def reopen(self) -> None:
        """Raises OSError, keeping the old file, if the path cannot be opened (a root-owned new file)."""
        if not self.path:
            return
        fresh = self._open()
        self.acquire()
        try:
            old, self.stream = self.stream, fresh
            old.close()
        finally:
            self.release()


_handler: _ReopenableHandler | None = None


def setup(level: str = "info", fmt: str = "text", path: str = "") -> None:
    """(Re)configure the root 'echod' logger. Raises OSError if the log file cannot be opened."""
    global _handler
    journal = not path and _stderr_is_journal()
    handler = _ReopenableHandler(path)
    handler.setFormatter(_JsonFormatter(journal) if fmt == "json" else _TextFormatter(journal))
    logger = logging.getLogger("echod")
    if _handler is not None:
        logger.removeHandler(_handler)
        if _handler.path:
            _handler.stream.close()
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    _handler = handler


def check_file(path: str) -> None:
    """Raise OSError if `path` (when set) cannot be opened for appending."""
    if path:
        with open(path, "a", encoding="utf-8"):
            pass


def detach() -> None:
    """Close the log file before something else (daemonizing) closes its descriptor under us."""
    global _handler
    if _handler is not None:
        logging.getLogger("echod").removeHandler(_handler)
        if _handler.path:
            _handler.stream.close()
        _handler = None


def reopen() -> bool:
    """Reopen the log file (SIGUSR1). A failure is logged to the old file, which stays in use: losing
    the log must not cost the service."""
    if _handler is None:
        return True
    try:
        _handler.reopen()
    except OSError as exc:
        logging.getLogger("echod").error(
            "cannot reopen log file %r, still writing to the old one: %s", _handler.path, exc.strerror
        )
        return False
    return True


def give_to(uid: int | None) -> None:
    """Make the open log file the account's that echod is about to become, so that the master can
    still reopen it after logrotate (whose `create` copies the old file's owner) once it is not root.
    Only the owner changes (a group such as adm keeps reading it), only for a regular file (never a
    terminal or /dev/stdout), and a failure (NFS root_squash, say) costs only that: a warning."""
    if _handler is None or not _handler.path or uid is None or os.geteuid() != 0:
        return
    fd = _handler.stream.fileno()
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchown(fd, uid, -1)
    except OSError as exc:
        logging.getLogger("echod").warning(
            "cannot give log file %r to uid %d (%s): reopening it after a rotation may fail",
            _handler.path, uid, exc.strerror,
        )  # fmt: skip


def check_access_log(path: str) -> None:
    """Raise OSError if the access log (a path, not "" or "-") cannot be opened for appending. Never
    blocks: a FIFO with no reader yet (ENXIO) is fine, the workers open it once it has one."""
    if path in ("", "-"):
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o640))
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise


def give_access_log(path: str, uid: int | None) -> None:
    """Create the access log (the workers open it themselves, after the master has dropped root, maybe
    in a directory only root may write to) and give it to `uid`, as give_to does the service log."""
    if path in ("", "-") or uid is None or os.geteuid() != 0:
        return
    try:
        check_access_log(path)
        if stat.S_ISREG(os.stat(path).st_mode):
            os.chown(path, uid, -1)
    except OSError as exc:
        logging.getLogger("echod").warning(
            "cannot give access log %r to uid %d (%s)", path, uid, exc.strerror
        )


def _stderr_is_journal() -> bool:
    # systemd sets JOURNAL_STREAM=dev:ino of the stream it connected; only trust it if it is ours.
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)
