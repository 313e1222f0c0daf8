"""SIGTERM and SIGHUP handled like Ctrl-C.

SLURM, Kubernetes and `timeout` stop a job with SIGTERM; a closed terminal sends SIGHUP. Python's
default for both is to die on the spot: the MLflow run stays RUNNING and temporary folders stay
behind. Here both raise ``Terminated``, a ``KeyboardInterrupt``, in the main thread, so every
``except KeyboardInterrupt`` / ``finally`` that already cleans up after Ctrl-C (the run ends KILLED,
work folders are removed, finished checkpoints stay) does the same for them. The process then exits
with 128 + the signal number, as a shell reports a process killed by that signal.

Reusable by any entry point (the CLI, each torchrun rank): call ``install()`` once, early, in the
main thread, and exit with ``exit_code(exc)`` when a ``KeyboardInterrupt`` reaches the top.
"""

from __future__ import annotations

import signal
import threading

HANDLED = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM or SIGHUP."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"received {signal.Signals(signum).name}")


_received: list[int] = []


def _raise_terminated(signum: int, frame) -> None:
    # Only the first signal interrupts: a second one (SLURM and torchrun may repeat it) must not break
    # the clean-up the first one started. SIGKILL still ends the process at any time.
    if _received:
        return
    _received.append(signum)
    raise Terminated(signum)


def install() -> bool:
    """Turn SIGTERM and SIGHUP into ``Terminated``. Returns False (and changes nothing) outside the
    main thread, where Python cannot install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in HANDLED:
        signal.signal(sig, _raise_terminated)
    return True


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal that interrupted: 143 for SIGTERM, 129 for SIGHUP, 130 for Ctrl-C."""
    return 128 + getattr(exc, "signum", signal.SIGINT)


def describe(exc: KeyboardInterrupt) -> str:
    return signal.Signals(exc.signum).name if isinstance(exc, Terminated) else "Ctrl-C"
