"""Run the real `aaclip` CLI in a subprocess (its own process, signals, stderr that is not a terminal)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable

CLI = [sys.executable, "-c", "from aaclip_cli.main import main; main()"]


def set_flags(*overrides: str | Iterable[str]) -> list[str]:
    """``--set`` flags for overrides given one by one or in lists:
    ``set_flags("a=1", ["b=2"])`` -> ``["--set", "a=1", "--set", "b=2"]``."""
    flat = [o for group in overrides for o in ([group] if isinstance(group, str) else group)]
    return [x for o in flat for x in ("--set", o)]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # The children's stderr is a pipe. Variables that ask for colour regardless (set by some CI
    # services: typer forces colour under GITHUB_ACTIONS) are removed: without them none may appear.
    for key in ("FORCE_COLOR", "CLICOLOR_FORCE", "PY_COLORS", "GITHUB_ACTIONS", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(key, None)
    env.update(extra)
    return env


def as_at_a_terminal() -> None:
    """A child's ``preexec_fn``: Ctrl-C (SIGINT) as a command typed at a terminal gets it. A shell runs
    a background job (CI started with ``&``) with SIGINT ignored, children inherit that, and Python
    then leaves it ignored: a test that sends SIGINT would see nothing happen."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def aaclip(*args: str, timeout: float = 300, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("preexec_fn", as_at_a_terminal)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or child_env(), **kwargs)


def start_aaclip(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    kwargs.setdefault("preexec_fn", as_at_a_terminal)
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or child_env(), **kwargs)


def one_paragraph(stderr: str) -> bool:
    """An error as users should see it: no traceback, no colour codes, no blank line inside."""
    text = stderr.strip()
    return bool(text) and "Traceback" not in text and "\x1b[" not in text and "\n\n" not in text
