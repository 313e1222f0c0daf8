"""SIGTERM and SIGHUP handled like Ctrl-C.

SLURM, Kubernetes and `timeout` stop a job with SIGTERM; a closed terminal sends SIGHUP. Python's
default for both is to die on the spot: the MLflow run stays RUNNING and temporary folders stay
behind. Here both raise ``Terminated``, a ``KeyboardInterrupt``, in the main thread, so every
``except KeyboardInterrupt`` / ``finally`` that already cleans up after Ctrl-C (the run ends KILLED,
work folders are removed, finished checkpoints stay) does the same for them. The process then exits
with 128 + the signal number, as a shell reports a process killed by that signal.

Reusable by any entry point (the CLI, each torchrun rank): call ``install()`` once, early, in the
main thread, and exit with ``exit_code(exc)`` when a ``KeyboardInterrupt`` reaches the top.

Safe points: an interrupt raised inside a store write (SQLAlchemy's ``executemany``, an artifact
copy) leaves the transaction open and SQLite's write lock held, so ending the run KILLED then fails
with "database is locked". Code that must not be cut in the middle runs under ``shielded()``: a
signal that arrives there is held and raised when the block ends.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HANDLED = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM or SIGHUP."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"received {signal.Signals(signum).name}")


class Stopped(KeyboardInterrupt):
    """A job stopped on purpose by its own caller (a sweep's pruner): like an interrupt, its run
    ends KILLED and its finished checkpoints stay; the caller catches it, the user never sees it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


_received: list[int] = []
# How deep the main thread is in shielded blocks, and the interrupt held back until it leaves them.
_shield_depth = 0
_held: list[BaseException] = []


def interrupt(exc: BaseException) -> None:
    """Raise ``exc`` (from a signal handler) now, or when the main thread leaves its shielded block."""
    if _shield_depth:
        if not _held:
            _held.append(exc)
        return
    raise exc


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Hold SIGTERM, SIGHUP and Ctrl-C until the block ends, then raise the first one that came (it
    replaces an error the block raised: the user asked to stop). Other threads are never interrupted
    by signals, so there it does nothing."""
    global _shield_depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _shield_depth += 1
    try:
        yield
    finally:
        _shield_depth -= 1
        if not _shield_depth and _held:
            raise _held.pop()


def _raise_terminated(signum: int, frame) -> None:
    # Only the first signal interrupts: a second one (SLURM and torchrun may repeat it) must not break
    # the clean-up the first one started. SIGKILL still ends the process at any time.
    if _received:
        return
    _received.append(signum)
    interrupt(Terminated(signum))


def _raise_keyboard_interrupt(signum: int, frame) -> None:
    interrupt(KeyboardInterrupt())  # Python's own Ctrl-C, but held inside shielded blocks


def install() -> bool:
    """Turn SIGTERM and SIGHUP into ``Terminated`` and Ctrl-C into ``KeyboardInterrupt``, both held
    inside ``shielded()`` blocks. Returns False (and changes nothing) outside the main thread, where
    Python cannot install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in HANDLED:
        signal.signal(sig, _raise_terminated)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # a caller's own handler is kept
        signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    return True


def stand_down() -> None:
    """The command has ended (its result printed, its run closed). A signal from here on would only
    cut into Python's own clean-up at exit, where a finalizer hit by the interrupt prints "Exception
    ignored in ... Traceback"; so the signals are ignored and the process ends as it was about to."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (*HANDLED, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def leave_to_parent(worker_id: int = 0) -> None:
    """A DataLoader worker's ``worker_init_fn``: a cluster signals the whole process group, and a
    worker that dies of it makes the main process fail with "DataLoader worker exited unexpectedly"
    instead of stopping cleanly. Workers ignore the signals; the main process ends them."""
    for sig in (*HANDLED, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal that interrupted: 143 for SIGTERM, 129 for SIGHUP, 130 for Ctrl-C."""
    return 128 + getattr(exc, "signum", signal.SIGINT)


def describe(exc: KeyboardInterrupt) -> str:
    return signal.Signals(exc.signum).name if isinstance(exc, Terminated) else "Ctrl-C"


def note_unended(exc: BaseException, run_id: str, why: str) -> None:
    """Record on the interrupt (or a torchrun rank's stop) on its way out that ``run_id`` could not be
    ended KILLED (the store could not be written: a full disk, a lost server), so the paragraph that
    reports the interrupt says so."""
    exc.unended_runs = [*getattr(exc, "unended_runs", []), run_id]
    exc.unended_why = why


def unended(exc: BaseException) -> str:
    """What the user must do about runs the interrupt left RUNNING, as a sentence ("" when none)."""
    runs = getattr(exc, "unended_runs", [])
    if not runs:
        return ""
    which = f"run {runs[0]}" if len(runs) == 1 else "runs " + " and ".join(runs)
    mark = "; ".join(f"`aaclip runs --mark-dead {r}`" for r in runs)
    return (f"The {which} could not be marked KILLED ({exc.unended_why}), so it still shows RUNNING; once the "
            f"store can be written again, end it with {mark}.")
