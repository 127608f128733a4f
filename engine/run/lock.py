"""Who may write a run folder: one run at a time, and nothing of a run outlives its main process.

- ``RunLock``: an exclusive ``flock`` on ``OUT/work/lock`` for as long as a run writes ``OUT``. A second ``score``
  or ``run`` on the same folder fails at once with a UserError naming the folder and the holder's pid. The kernel
  drops an flock when the last descriptor of its file closes, so a run killed with ``kill -9`` leaves no stale
  lock (the file stays; only the lock on it matters).
- ``die_with_parent`` / ``tie_forks``: the map workers fork from a forkserver, not from the main process, so a
  ``kill -9`` of the main process used to leave the forkserver and its workers running, still writing shards into
  the folder a rerun was writing too (Python's forkserver stops only when every worker has closed its end of the
  "alive" pipe, and an idle pool worker waits on its call queue forever). On Linux, ``prctl(PR_SET_PDEATHSIG,
  SIGKILL)`` makes the kernel kill a process when its parent dies: the forkserver is tied to the main process when
  it imports this module (``start_forkserver``: the only import-time effect here, and only in a direct child of the
  process that set ``$WINNOW_RUN_OWNER`` to its own pid), and every process it forks is tied to it by an ``os.fork`` hook,
  so killing the main process takes the forkserver and, through it, every worker with it, at once. Elsewhere
  (no prctl) the map workers poll the main process instead (``watch_process``).
- ``pause_point``: a test hook that stops a run at a known moment so a test can kill it there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Self

from engine.errors import UserError

OWNER_ENV = "WINNOW_RUN_OWNER"  # pid of the run's main process, inherited by the forkserver it starts
PAUSE_ENV = "WINNOW_PAUSE_AT"  # tests: map:N | shard:I | global | finalize (see pause_point)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class RunLock:
    """``with RunLock(out):`` holds the run folder ``out`` for this process (a UserError if another holds it)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / "work" / "lock"
        self._fd: int | None = None

    def __enter__(self) -> Self:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(
                f"{self.folder}: another winnow run (pid {holder}) is writing this run folder; wait "
                f"for it to end, or use another --out"
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # A file system without locks (some network mounts): run unlocked rather than not at all.
            print(
                f"winnow: warning: {self.path}: cannot lock the run folder ({e.strerror}); make sure no other "
                f"run writes it",
                file=sys.stderr,
            )
            return self
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _holder(fd: int) -> str:
    """The pid the holder wrote into the lock file (it writes it right after locking: retry briefly)."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return text
        time.sleep(0.01)
    return "unknown"


# ------------------------------------------------------------------------------------------- process lifetime
def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux); False where that is not available.

    The kernel clears the setting in a forked child and watches the parent *thread*: the forkserver is started by
    the thread that first submits work (the driver's main thread), and the forkserver has one thread."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


_forking_pid = [0]


def _before_fork() -> None:
    _forking_pid[0] = os.getpid()


def _after_fork_in_child() -> None:
    # If the parent died between fork() and prctl(), no signal will come: check, and go.
    if die_with_parent() and os.getppid() != _forking_pid[0]:
        os._exit(1)


def tie_forks() -> None:
    """Tie every process this process forks from now on to it (``die_with_parent`` in the child)."""
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def start_forkserver(preload: list[str]) -> None:
    """Start this process's forkserver now, importing ``preload`` (this module first), tied to this process.

    ``$WINNOW_RUN_OWNER`` is set only while the forkserver starts, so no other child sees it. A forkserver that
    already runs (started by earlier work in this process) is kept as it is."""
    from multiprocessing import forkserver

    forkserver.set_forkserver_preload(["engine.run.lock", *[m for m in preload if m != "engine.run.lock"]])
    old = os.environ.get(OWNER_ENV)
    os.environ[OWNER_ENV] = str(os.getpid())
    try:
        forkserver.ensure_running()
    finally:
        if old is None:
            os.environ.pop(OWNER_ENV, None)
        else:
            os.environ[OWNER_ENV] = old


def watch_process(pid: int, interval: float = 0.5) -> None:
    """Without prctl: a daemon thread that ends this process once ``pid`` is gone."""

    def watch():
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass
            time.sleep(interval)

    threading.Thread(target=watch, name="winnow-watch-owner", daemon=True).start()


def _tie_forkserver() -> None:
    """In the run's forkserver: die with the main process, and have every worker die with the forkserver."""
    owner = int(os.environ[OWNER_ENV])
    if die_with_parent() and os.getppid() != owner:
        os._exit(1)  # the main process died before the prctl above
    tie_forks()


# ------------------------------------------------------------------------------------------------- test hooks
def pause_point(point: str) -> None:
    """Test hook: with ``WINNOW_PAUSE_AT=<point>``, write this process's pid to ``$WINNOW_PAUSE_FILE`` (if set) and
    sleep ``$WINNOW_PAUSE_S`` seconds (default 60) here, so a test can kill or interrupt the run at a known moment.

    Points: ``map:N`` (the driver, after N shards of the map phase finished), ``shard:I`` (the process mapping shard
    I, after its first batch went to the writer: temp files are open), ``global`` (after the first global stage),
    ``finalize`` (inside each part's write of ``scores/``, after its first batch)."""
    if os.environ.get(PAUSE_ENV) != point:
        return
    marker = os.environ.get("WINNOW_PAUSE_FILE")
    if marker:
        tmp = Path(f"{marker}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, marker)
    # Slept like a long C call (a kernel, a model's forward pass) runs: Ctrl-C does not cut it short, Python raises
    # KeyboardInterrupt once it returns.
    deadline = time.monotonic() + float(os.environ.get("WINNOW_PAUSE_S", "60"))
    interrupted = False
    while (left := deadline - time.monotonic()) > 0:
        try:
            time.sleep(left)
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt


# The one import-time effect (see the module's docstring): only in a direct child of a run's main process, which is
# how the forkserver imports this module (set_forkserver_preload); the main process itself is not its own child.
if os.environ.get(OWNER_ENV) == str(os.getppid()):
    _tie_forkserver()
