"""The one translation point from a store client's exception (MLflow, SQLAlchemy, SQLite, requests)
to a user-facing ``StoreError``: one paragraph naming the store URI and the cause (read-only, locked,
unreachable, refused credentials, wrong schema version), never the driver's traceback text."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from aaclip_core.errors import AaclipError, StoreError


def _exception_chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen) or len(seen) > 20:
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__]
    return seen


def _http_status(chain: list[BaseException]) -> int | None:
    for e in chain:
        getter = getattr(e, "get_http_status_code", None)
        if callable(getter):
            with contextlib.suppress(Exception):
                return int(getter())
    return None


_HTTP_VARS = "MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_TIMEOUT"


# What SQLite and MLflow's migrations say (lower case, anywhere in the exception chain) -> the cause,
# tried in this order.
_SQLITE_CAUSES = (
    (("readonly database", "read-only file system"),
     "is read-only for this process (SQLite: attempt to write a readonly database)"),
    (("database is locked",), "is locked by another process (SQLite waited and gave up)"),
    (("unable to open database file",),
     "cannot be opened: the database file or its folder is missing or not accessible"),
    (("file is not a database", "database disk image is malformed"),
     "is not a readable SQLite database (the file is damaged or of another kind)"),
    (("out-of-date database schema",),
     "has an older schema version than this MLflow expects (back it up, then run `mlflow db upgrade URI`)"),
    (("can't locate revision",),
     "was written by a newer MLflow (unknown schema version); use that MLflow version or a new store"),
)


def classify_store_failure(exc: BaseException) -> str | None:
    """The cause of a store failure in words, or None when it is not recognisably the store's."""
    chain = _exception_chain(exc)
    text = " | ".join(f"{type(e).__name__}: {e}" for e in chain).lower()
    for needles, cause in _SQLITE_CAUSES:
        if any(n in text for n in needles):
            return cause
    status = _http_status(chain)
    if status in (401, 403) or " 401 " in text or " 403 " in text:
        return (f"refused our credentials (HTTP {status or 'auth error'}); set MLFLOW_TRACKING_USERNAME / "
                "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
    if any(k in text for k in ("nameresolutionerror", "name or service not known", "failed to resolve",
                               "temporary failure in name resolution", "nodename nor servname")):
        return "cannot be reached: its host name does not resolve (DNS)"
    if "connection refused" in text:
        return f"cannot be reached: connection refused (is the server running on that port?); retries: {_HTTP_VARS}"
    if "timed out" in text or "timeout" in text:
        return f"did not answer in time (timeout); raise {_HTTP_VARS} for a slow server"
    if "max retries exceeded" in text or "connectionerror" in text:
        return f"cannot be reached (connection failed); retries: {_HTTP_VARS}"
    if status is not None and status >= 500 and any(type(e).__name__ == "RestException" for e in chain):
        return f"answered with a server error (HTTP {status}: {_first_line(exc)}); see the server's log"
    if any(type(e).__module__.split(".")[0] in _DRIVER_MODULES for e in chain) or "api request to" in text:
        return _failed(exc)  # the database driver's own error, or the server's unexpected answer (MLflow's words)
    return None


# Exceptions of these packages come from the store's database driver, never from aaclip's own code.
_DRIVER_MODULES = frozenset({"sqlalchemy", "sqlite3", "alembic"})


def _first_line(exc: BaseException) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return re.sub(r"\s*\[SQL:.*", "", first_line)[:200]


def _failed(exc: BaseException) -> str:
    return f"failed ({type(exc).__name__}: {_first_line(exc)})"


def store_failure(uri: str, exc: BaseException, doing: str) -> StoreError:
    """The one translation point from a driver/client exception to a user-facing StoreError."""
    cause = classify_store_failure(exc) or _failed(exc)
    return StoreError(
        f"The MLflow store '{uri}' {cause}, while {doing}. Check --tracking-uri / MLFLOW_TRACKING_URI "
        "(unset, aaclip uses ./mlflow.db)."
    )


@contextlib.contextmanager
def store_call(mlflow, doing: str) -> Iterator[None]:
    """Run store calls; a failure ``classify_store_failure`` recognises as the store's becomes a
    StoreError naming the URI and the cause. Anything else (aaclip's errors, a bug such as a
    TypeError, an MLflow error that is not the store failing) goes on unchanged, with its type."""
    try:
        yield
    except AaclipError:
        raise
    except Exception as exc:
        if classify_store_failure(exc) is None:
            raise
        raise store_failure(mlflow.get_tracking_uri(), exc, doing) from None


def is_transient(exc: BaseException) -> bool:
    """Another process holds the store (SQLite busy) or is creating it: worth retrying."""
    text = " ".join(str(e) for e in _exception_chain(exc)).lower()
    return "database is locked" in text or "duplicate column" in text or "already exists" in text
