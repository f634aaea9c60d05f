"""A real systemd, PID 1 of a throwaway container, for tests/test_systemd.py.

The recipe of /work/shared/NOTES.md ("A real systemd, booted in a throwaway container"): a tmpfs-backed
overlay of the machine's root, booted with `systemd-nspawn --boot --register=no --keep-unit`. Every write
the container makes (its /tmp cleaning included) lands in the tmpfs. The tmpfs and the overlay are
mounted in a private mount namespace (`unshare --mount`) that holds nothing but systemd-nspawn, so they
disappear with it even if the test run is killed; nothing is ever mounted in the machine's own namespace.

The container boots `echod-box.target` (sysinit + sockets only): the machine's own enabled services
(haproxy, postgresql, prometheus, ...) must not start, because the container shares the machine's
network. Commands run inside with `nsenter -t <container's PID 1> -a`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from conftest import children, comm

# What commands inside the container see: the machine's environment (PIP_*, a pyenv PATH, ...) stays out.
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_LESS": "",
}

BOX_TARGET = """\
[Unit]
Description=echod test box: sysinit and sockets only, none of the machine's own services
Requires=sysinit.target sockets.target
After=sysinit.target sockets.target
AllowIsolate=yes
"""

# Runs in its own mount namespace; exit codes 90/91 mean this machine cannot mount what we need.
LAUNCH = r"""
set -u
D=$1
mount -t tmpfs -o mode=0755 tmpfs "$D" || exit 90
mkdir "$D/upper" "$D/work" "$D/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$D/upper,workdir=$D/work" "$D/root" || exit 91
mkdir -p "$D/root/etc/systemd/system"
printf '%s' "$2" >"$D/root/etc/systemd/system/echod-box.target"
exec systemd-nspawn -q -D "$D/root" --boot --register=no --keep-unit systemd.unit=echod-box.target
"""

CANNOT_MOUNT = {90: "cannot mount a tmpfs here", 91: "cannot mount an overlay of / here"}
PR_SET_PDEATHSIG = 1


def cannot_boot() -> str | None:
    """Why this machine cannot boot the container, or None."""
    if os.geteuid() != 0:
        return "needs root (mounts an overlay, boots systemd-nspawn)"
    for tool, package in (("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux"),
                          ("unshare", "util-linux")):  # fmt: skip
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package {package}; tests/install-system-deps.sh)"
    if not os.access("/lib/systemd/systemd", os.X_OK):
        return "systemd is not installed"
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError:
        filesystems = ""
    if "\toverlay\n" not in filesystems:
        return "the kernel has no overlayfs"
    if subprocess.run(["/usr/bin/python3", "-c", "import venv, ensurepip"], capture_output=True).returncode:
        return "Debian's /usr/bin/python3 with venv (python3-venv) is missing"
    return None


def _die_with_parent() -> None:
    # systemd-nspawn powers the container off on SIGTERM: a killed test run leaves nothing behind.
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class BootFailed(Exception):
    pass


class Box:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.mountpoint = base / "mnt"
        self.console = base / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0
        self.boot_seconds = 0.0

    # -- life cycle -----------------------------------------------------------------------------
    def boot(self, timeout: float = 60.0) -> None:
        self.mountpoint.mkdir()
        started = time.monotonic()
        with self.console.open("wb") as out:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private",
                 "/bin/sh", "-c", LAUNCH, "launch", str(self.mountpoint), BOX_TARGET],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        deadline = started + timeout
        state = ""
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                why = CANNOT_MOUNT.get(code, f"systemd-nspawn exited with {code}")
                raise BootFailed(f"{why}:\n{self.console_text()}")
            if not self.pid1:
                self.pid1 = _container_init(self.proc.pid)
            if self.pid1:
                state = self.sh("systemctl is-system-running", check=False, timeout=10).stdout.strip()
                if state in ("running", "degraded"):
                    self.boot_seconds = time.monotonic() - started
                    return
            time.sleep(0.1)
        raise BootFailed(f"not booted after {timeout:.0f} s (state {state!r}):\n{self.console_text()}")

    def teardown(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if self.pid1:
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    self.sh("systemctl poweroff", check=False, timeout=10)
            else:  # a boot that never got as far: systemd-nspawn powers the container off on SIGTERM
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            # Killing the container's PID 1 kills every process of its PID namespace; pid1 0 would be
            # our own process group. (Before the PID 1 lookup was fixed, a wrong pid1 here left the
            # container's systemd running after the tests.)
            if self.pid1 > 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid1, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.proc = None

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- commands -------------------------------------------------------------------------------
    def command(self, argv: list[str], timeout: float = 60.0, check: bool = True,
                input: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        assert self.pid1, "the container is not running"
        proc = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", *argv],
            input=input, capture_output=True, text=True, timeout=timeout, env=ENV,
        )  # fmt: skip
        if check and proc.returncode:
            raise AssertionError(
                f"in the container, {shlex.join(argv)} exited with {proc.returncode}:\n"
                f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
            )
        return proc

    def sh(self, script: str, timeout: float = 60.0, check: bool = True,
           input: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        return self.command(["/bin/sh", "-c", script], timeout=timeout, check=check, input=input)

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        quoted = shlex.quote(path)
        self.sh(f"mkdir -p $(dirname {quoted}) && cat >{quoted} && chmod {mode:o} {quoted}", input=text)

    def remove(self, path: str) -> None:
        self.sh(f"rm -f {shlex.quote(path)}")

    def copy_in(self, source: Path, names: list[str], dest: str) -> None:
        """Copy source/NAME for each name into the container's dest directory (tar through a pipe)."""
        tar = subprocess.Popen(["tar", "-C", str(source), "-cf", "-", *names], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        try:
            subprocess.run(
                ["nsenter", "-t", str(self.pid1), "-a", "/bin/sh", "-c",
                 f"mkdir -p {shlex.quote(dest)} && tar -C {shlex.quote(dest)} -xf -"],
                stdin=tar.stdout, check=True, timeout=60, env=ENV,
            )  # fmt: skip
        finally:
            tar.stdout.close()
            tar.wait(10)

    # -- systemd --------------------------------------------------------------------------------
    def systemctl(
        self, *args: str, timeout: float = 90.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.command(["systemctl", *args], timeout=timeout, check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def prop(self, unit: str, name: str) -> str:
        return self.show(unit, name).get(name, "")

    def cursor(self) -> str:
        """The journal's position now: journal(after=cursor) shows only what came later."""
        out = self.command(["journalctl", "-q", "-n", "1", "-o", "json", "--no-pager"]).stdout
        return json.loads(out.splitlines()[-1])["__CURSOR"] if out.strip() else ""

    def journal(self, unit: str = "echod.service", after: str = "", *extra: str) -> str:
        argv = ["journalctl", "-q", "--no-pager", "-u", unit, "-o", "short-monotonic", *extra]
        if after:
            argv.append(f"--after-cursor={after}")
        return self.command(argv).stdout

    def processes(self, unit: str = "echod.service") -> dict[int, tuple[int, str]]:
        """pid -> (parent pid, comm) of every process in the unit's cgroup (the container's PIDs)."""
        cgroup = self.prop(unit, "ControlGroup")
        if not cgroup:
            return {}
        dirs = " ".join(f"/sys/fs/cgroup{sub}{cgroup}" for sub in ("", "/unified", "/systemd"))
        script = f"for d in {dirs}; do [ -r $d/cgroup.procs ] && {{ cat $d/cgroup.procs; break; }}; done"
        result: dict[int, tuple[int, str]] = {}
        for pid in self.sh(script, check=False).stdout.split():
            stat = self.sh(f"cat /proc/{pid}/stat 2>/dev/null", check=False).stdout
            if ")" in stat:
                comm = stat[stat.index("(") + 1 : stat.rindex(")")]
                result[int(pid)] = (int(stat.rsplit(")", 1)[1].split()[1]), comm)
        return result


def _container_init(launcher: int) -> int:
    """The container's systemd, once systemd-nspawn has started it; 0 until then. Until the launch
    script has exec'd systemd-nspawn, its children are `mount` and `mkdir`: taking one of those for the
    container's PID 1 (a loaded machine makes that likely) left every nsenter failing, and the boot
    timed out (state '')."""
    if comm(launcher) != "systemd-nspawn":
        return 0
    for child in children(launcher):
        if comm(child) == "systemd":
            return child
    return 0
