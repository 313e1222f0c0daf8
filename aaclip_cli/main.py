"""`aaclip`: train, test, compare and diagnose AA-CLIP runs.

Results go to stdout (the run id, a table, or with --json one JSON document); progress and notes to
stderr. User errors print one paragraph and exit 2; an interrupted command exits 130.
"""

from __future__ import annotations

import os

# Each command module registers its commands on `app` when imported; the help lists them in
# workflow order (app.WORKFLOW_ORDER) whatever the import order.
from aaclip_cli import (  # noqa: F401
    compare_cmd,
    data_cmd,
    doctor_cmd,
    predict_cmd,
    prompts_cmd,
    recipes_cmd,
    register_cmd,
    runs_cmd,
    sweep_cmd,
    test_cmd,
    train_cmd,
    transfer_cmd,
)
from aaclip_cli.app import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - entry point
    from aaclip_core.signals import exit_code, install, stand_down

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    install()  # SIGTERM/SIGHUP end a run KILLED, like Ctrl-C
    try:
        app(prog_name="aaclip")
    except KeyboardInterrupt as exc:
        # Arrived outside a command: after it ended (its run already closed) or before it began.
        raise SystemExit(exit_code(exc)) from None
    finally:
        stand_down()  # a signal during the interpreter's exit clean-up must not print its traceback


if __name__ == "__main__":  # pragma: no cover
    main()
