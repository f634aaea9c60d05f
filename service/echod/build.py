"""Which build of echod runs: the data path compiled with mypyc, or all of it interpreted.

One source, two builds (README "Building"): `setup.py` compiles the modules named in COMPILED with
mypyc when a C compiler and Python's headers are there (and ECHOD_COMPILE is not 0); otherwise, and
always for an editable install, every module runs as the `.py` it is. setup.py reads COMPILED from
this file's text (it cannot import echod: the build environment lacks its dependencies), so COMPILED
stays a plain literal.

A compiled build records the SHA-256 of each compiled module's source in `echod/_compiled.py`, which
only setup.py writes, into the build, never into the checkout. A compiled module whose `.py` beside it
no longer has that digest (an edited installed copy), or a compiled module without a record at all
(a `.so` put into a checkout by hand, which Python would prefer to the edited `.py`), is stale:
`check()` names it, and echod refuses to start rather than run code older than its source.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
from pathlib import Path

from . import __version__

# Modules compiled with mypyc: the event loop and its fast path and everything it calls per event or
# per connection. Add a module here and it is compiled from the next build on (mypyc's rules apply
# to it: see README "Building"); a module mypyc cannot compile fails the build, naming it.
COMPILED = (
    "echod.worker.loop",
    "echod.worker.fastpath",
    "echod.worker.core",
    "echod.worker.accept",
    "echod.worker.echo",
    "echod.worker.output",
    "echod.worker.splice",
    "echod.worker.peers",
    "echod.worker.tls",  # TlsConn subclasses core.Owing: no interpreted class may subclass a compiled one
    "echod.worker.insight",  # every close: histograms and TCP_INFO (worker/insight.py)
    "echod.worker.access_log",
    "echod.tcpinfo",
    "echod.idle",
    "echod.udp",
)


def _is_extension(path: str | None) -> bool:
    return path is not None and path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def compiled_modules() -> list[str]:
    """The modules of COMPILED that were imported from a compiled extension."""
    return [name for name in COMPILED if _is_extension(importlib.import_module(name).__file__)]


def is_compiled() -> bool:
    return bool(compiled_modules())


def describe() -> str:
    """`0.1.0 (compiled: 9 of 9 data-path modules)` or `0.1.0 (interpreted)`."""
    done = compiled_modules()
    if not done:
        return f"{__version__} (interpreted)"
    return f"{__version__} (compiled: {len(done)} of {len(COMPILED)} data-path modules)"


def _recorded() -> dict[str, str]:
    try:
        record = importlib.import_module("echod._compiled")
    except ImportError:
        return {}
    digests: dict[str, str] = record.SOURCE_SHA256
    return digests


def stale_modules() -> list[str]:
    """Compiled modules that do not match the source beside them (see the module docstring)."""
    recorded = _recorded()
    stale = []
    for name in compiled_modules():
        so = importlib.import_module(name).__file__
        assert so is not None  # compiled_modules() only lists modules loaded from a file
        source = Path(so).parent / (name.rpartition(".")[2] + ".py")
        try:
            digest = hashlib.sha256(source.read_bytes()).hexdigest()
        except OSError:
            continue  # no source beside it to be older than (an installation that ships none)
        if recorded.get(name) != digest:
            stale.append(name)
    return stale


def check() -> str | None:
    """Why this installation must not run (stale compiled modules), or None when it may."""
    stale = stale_modules()
    if not stale:
        return None
    return (
        f"compiled module(s) {', '.join(stale)} do not match their source: rebuild echod "
        "(pip install . or deploy/install.sh), or remove the stale .so files"
    )
