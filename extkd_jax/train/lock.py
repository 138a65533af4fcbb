"""One writer per workdir: an exclusive lock held for a whole run, refused to a second process with its holder named.

Local workdirs use an advisory `fcntl.flock` on `<workdir>/.lock`: the kernel drops it when the holding process
exits, however it exits (SIGKILL included), so a killed run never leaves it stuck. The file also records who holds
it (pid, host, start time) for the refusal message. Object stores (`gs://`) have no file locks: there the lock is
a record that its holder refreshes every `HEARTBEAT_S` seconds from a background thread, and a record older than
`STALE_S` counts as abandoned (a killed holder), and so does, at once, a record of this same host (hostname and
boot id) whose pid is no longer alive; two processes starting within the same second on a bucket are not told apart
(documented limit). In a multi-host run only process 0 takes the lock: the others follow it.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
from typing import Any

from etils import epath

LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 180.0


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir."""


def _holder_text(holder: dict[str, Any], workdir: epath.Path) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return (
        f"workdir {workdir} is in use by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
        f"(`extkd {holder.get('command', '?')}` since {since}); wait for it to finish or stop it "
        "(rerunning the same command afterwards resumes), or use another --workdir"
    )


def _boot_id() -> str | None:
    """This machine's boot id (Linux): tells a host apart from another of the same name, and from itself rebooted."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _me(command: str) -> dict[str, Any]:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": command}
    boot = _boot_id()
    return {**me, "boot_id": boot} if boot else me


def _dead_here(holder: dict[str, Any]) -> bool:
    """Whether the holder ran on this host (same hostname and, when both recorded one, boot id) and its pid is no
    longer alive: a killed run, whose record need not wait `STALE_S` to be taken over."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    boot = _boot_id()
    if holder.get("boot_id") and boot and holder["boot_id"] != boot:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's
        return False
    return False


class WorkdirLock:
    """Context manager: `with WorkdirLock(workdir, "train"):` holds the workdir for the block."""

    def __init__(self, workdir: str | epath.PathLike, command: str, enabled: bool = True):
        self.workdir = epath.Path(workdir)
        self.command = command
        self.enabled = enabled
        self.read_only = False  # the workdir cannot be written: nothing to protect, a finished run can still report
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> epath.Path:
        return self.workdir / LOCK_FILE

    def __enter__(self) -> WorkdirLock:
        if self.enabled:
            try:
                self.workdir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                if not self.workdir.is_dir():
                    raise OSError(f"cannot create workdir {self.workdir}: {err}") from None
            if "://" in str(self.workdir):
                self._acquire_remote()
            else:
                self._acquire_local()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _acquire_local(self) -> None:
        import fcntl

        try:
            fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            self.read_only = True
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(self.path)
            os.close(fd)
            raise WorkdirLockedError(_holder_text(holder, self.workdir)) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_me(self.command)).encode())
        os.fsync(fd)
        self._fd = fd

    def _acquire_remote(self) -> None:
        holder = _read_holder(self.path)
        mine = (holder.get("host"), holder.get("pid")) == (socket.gethostname(), os.getpid())
        fresh = time.time() - holder.get("heartbeat", 0) < STALE_S
        if holder and fresh and not mine and not _dead_here(holder):
            raise WorkdirLockedError(_holder_text(holder, self.workdir))
        me = _me(self.command)
        self._write_remote(me)
        time.sleep(0.5)  # a process that wrote at the same moment: the last writer wins, the other sees it
        if _read_holder(self.path).get("since") != me["since"]:
            raise WorkdirLockedError(_holder_text(_read_holder(self.path), self.workdir))
        self._thread = threading.Thread(target=self._heartbeat, args=(me,), daemon=True)
        self._thread.start()

    def _write_remote(self, me: dict[str, Any]) -> None:
        self.path.write_text(json.dumps({**me, "heartbeat": time.time()}))

    def _heartbeat(self, me: dict[str, Any]) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write_remote(me)
            except OSError:  # a transient storage error: the next beat tries again
                pass

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            try:
                self.path.unlink()
            except OSError:
                pass


def _read_holder(path: epath.Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}
