"""User-facing errors.

Every error a user can cause (bad recipe, missing file, wrong shape) is raised as an
``AaclipError`` whose message is one paragraph naming the file, field or flag and what to do.
The CLI prints the message and exits non-zero without a traceback; anything else is a bug.

The base classes and the ones scoring raises live in `aaclip_score.errors` (the torch-free scorer
raises them too, and aaclip's CLI must recognise them); this module re-exports them and adds the
training stack's own.
"""

from aaclip_score.errors import AaclipError, CheckpointError, ConfigError, DataError, LocalFileError, UnknownClass

__all__ = [
    "AaclipError", "CheckpointError", "ConfigError", "DataError", "JobFailed", "LocalFileError", "RankStopped",
    "SaidByRank0",
    "StoreError", "TrackingError", "TrainingDiverged", "UnknownClass", "WeightsError",
]


class WeightsError(AaclipError):
    """Backbone weights are missing or do not fit the model."""


class TrainingDiverged(AaclipError):
    """The loss became NaN or infinite."""


class TrackingError(AaclipError):
    """The MLflow store cannot be reached or a run is missing."""


class JobFailed(AaclipError):
    """A rank of a multi-process (torchrun) job failed; the message names the rank and why."""

    def __init__(self, message: str, summary: str) -> None:
        super().__init__(message)
        self.summary = summary


class SaidByRank0(ConfigError):
    """A user error that rank 0 of a torchrun job found and reports (exit 2); the other ranks raise this
    to exit 2 as well without printing the same paragraph again."""


class RankStopped(Exception):
    """A rank of a torchrun job received SIGTERM (torchrun stops the survivors when a rank dies;
    a scheduler stops them all). Not a user error: no AaclipError."""


class RunNotMarked(TrackingError):
    """A job failed and its run could not be ended FAILED either (the store could not be written: a
    full disk, a lost server), so it still shows RUNNING. The message is the job's own error, then
    which runs were left RUNNING and how to end them once the store can be written."""

    def __init__(self, cause: str, run_ids: list[str], why: str) -> None:
        self.cause, self.run_ids, self.why = cause, run_ids, why
        which = f"Run {run_ids[0]}" if len(run_ids) == 1 else "Runs " + " and ".join(run_ids)
        mark = "; ".join(f"`aaclip runs --mark-dead {r}`" for r in run_ids)
        super().__init__(
            f"{cause.rstrip()} {which} could not be marked FAILED either ({why}), so it still shows RUNNING; once "
            f"the store can be written again, end it with {mark}."
        )


class StoreError(TrackingError):
    """The MLflow store cannot be used: unreachable, read-only, locked, refused our credentials, or
    written by another MLflow version. Raised only by ``tracking.store_failure``, which names the
    store URI and the cause in one paragraph without the driver's traceback text."""
