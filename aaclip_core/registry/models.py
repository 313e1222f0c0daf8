"""The MLflow Model Registry: registered detectors, their versions and aliases.

`aaclip register` logs a detector as an MLflow Model linked to its training run and registers a new
version of a name; `aaclip predict --model models:/NAME@ALIAS` (or ``models:/NAME/VERSION``) finds the
version here and downloads its detector; `aaclip runs` shows which runs have versions. The MLflow
module comes from ``tracking.connect`` (this module does not import MLflow itself). Every refusal is
one paragraph naming the model, version or alias and what exists.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from aaclip_core.errors import AaclipError, StoreError, TrackingError
from aaclip_core.record import TAG_PREFIX
from aaclip_core.registry.failures import classify_store_failure, store_call, store_failure
from aaclip_core.registry.tracking import resolve_tracking_uri

MODELS_SCHEME = "models:/"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/@]+))$")
# The version tags aaclip writes (MLflow's version tags; the run's own tags are Tag in record.py).
VERSION_TAG_PREFIX = TAG_PREFIX


@dataclass(frozen=True)
class ModelRef:
    """A ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` URI, parsed."""

    name: str
    version: str | None = None
    alias: str | None = None

    @property
    def uri(self) -> str:
        return f"{MODELS_SCHEME}{self.name}" + (f"/{self.version}" if self.version else f"@{self.alias}")


def is_model_uri(text: str) -> bool:
    return str(text).startswith("models:")


def parse_model_uri(text: str) -> ModelRef:
    m = _URI.match(str(text).strip())
    if not m:
        raise TrackingError(
            f"--model {text}: a registered model is named models:/NAME/VERSION (e.g. models:/bottle-detector/3) or "
            "models:/NAME@ALIAS (e.g. models:/bottle-detector@champion)."
        )
    return ModelRef(m["name"], m["version"], m["alias"])


def _cannot_hold(uri: str, why: str) -> StoreError:
    return StoreError(
        f"The MLflow store '{uri}' cannot hold a Model Registry ({why}). Register models in a database store "
        "(--tracking-uri sqlite:///mlflow.db) or a team's `mlflow server` (--tracking-uri http://host:5000); "
        "`mlflow migrate-filestore` moves the runs of a ./mlruns folder into one."
    )


def check_registry_uri(tracking_uri: str | None) -> None:
    """A file store (./mlruns, file:...) cannot hold a registry where MLflow refuses it (3.17 does,
    unless MLFLOW_ALLOW_FILE_STORE=true): said before opening it."""
    uri = resolve_tracking_uri(tracking_uri)
    scheme = uri.split(":", 1)[0] if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", uri) else ""
    if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
        raise _cannot_hold(uri, "MLflow 3 refuses the file store that a folder such as ./mlruns is")


def registry_client(mlflow):
    """A client of the store's Model Registry, checked to answer; a store that has none (MLflow 3.17
    refuses the ./mlruns file store; a registry URI of an unknown scheme; a server without the
    registry's endpoints) is one paragraph naming the store."""
    uri = mlflow.get_tracking_uri()
    try:
        client = mlflow.MlflowClient()
        client.search_registered_models(max_results=1)
    except AaclipError:
        raise
    except Exception as exc:
        text = str(exc)
        if "Model Registry features are not supported" in text:
            raise _cannot_hold(uri, f"no registry for the URI scheme of '{mlflow.get_registry_uri()}'") from None
        if "filesystem tracking backend" in text or "maintenance mode" in text:
            raise _cannot_hold(uri, "this MLflow refuses the file store that ./mlruns is") from None
        if getattr(exc, "error_code", None) == "ENDPOINT_NOT_FOUND" or " 404" in text:
            raise _cannot_hold(uri, "the server has no Model Registry endpoints") from None
        if classify_store_failure(exc) is not None:
            raise store_failure(uri, exc, "opening its Model Registry") from None
        raise
    return client


def _versions_text(client, name: str) -> str:
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        return "it has no versions"
    aliases = client.get_registered_model(name).aliases or {}
    shown = ", ".join(str(n) for n in sorted(int(v.version) for v in versions))
    named = ", ".join(f"@{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
    return f"its versions are {shown}; its aliases: {named}"


def _registered_names(client) -> list[str]:
    return sorted(m.name for m in client.search_registered_models(max_results=1000))


def resolve_version(mlflow, ref: ModelRef):
    """The ModelVersion ``ref`` names. A name, version or alias that does not exist is one paragraph
    listing what does."""
    client = registry_client(mlflow)
    uri = mlflow.get_tracking_uri()
    with store_call(mlflow, f"looking up {ref.uri}"):
        names = _registered_names(client)
        if ref.name not in names:
            raise TrackingError(
                f"No registered model '{ref.name}' in the MLflow store '{uri}' (registered: "
                f"{', '.join(names) or 'none'}). Register one with `aaclip register --run RUN_ID --name {ref.name}`."
            )
        try:
            if ref.version:
                return client.get_model_version(ref.name, ref.version)
            return client.get_model_version_by_alias(ref.name, ref.alias)
        except Exception as exc:
            if getattr(exc, "error_code", None) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
        what = f"version {ref.version}" if ref.version else f"alias @{ref.alias}"
        raise TrackingError(
            f"Registered model '{ref.name}' has no {what} ({_versions_text(client, ref.name)}). Use one of these "
            f"in models:/{ref.name}/VERSION or models:/{ref.name}@ALIAS, or set an alias with "
            f"`aaclip register --run RUN_ID --name {ref.name} --alias ALIAS`."
        )


@dataclass(frozen=True)
class LoggedModel:
    model_uri: str
    model_id: str | None


def log_served_model(mlflow, run, name: str, code_file: Path, artifacts: dict[str, str], signature,
                     requirements: list[str], code_paths: list[str]) -> LoggedModel:
    """Log a pyfunc MLflow Model from code (``code_file`` calls ``mlflow.models.set_model``) linked to
    ``run`` (its source run, in the run's experiment) without reopening the run."""
    with store_call(mlflow, f"logging a model of run {run.info.run_id}"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow's advice to add type hints (this signature is declared)
        logged = mlflow.initialize_logged_model(name=name, source_run_id=run.info.run_id,
                                                experiment_id=run.info.experiment_id)
        info = mlflow.pyfunc.log_model(name=name, python_model=str(code_file), artifacts=artifacts,
                                       signature=signature, pip_requirements=requirements,
                                       code_paths=code_paths or None, model_id=logged.model_id)
    return LoggedModel(info.model_uri, getattr(info, "model_id", None) or logged.model_id)


def register_version(mlflow, name: str, model_uri: str, run_id: str, model_id: str | None, tags: dict[str, str],
                     description: str, alias: str | None):
    """A new version of ``name`` from the logged model at ``model_uri``, linked to run ``run_id``,
    with ``tags`` and ``description``; ``alias`` (if any) moved to it."""
    client = registry_client(mlflow)
    with store_call(mlflow, f"registering a version of '{name}'"):
        if name not in _registered_names(client):
            try:
                client.create_registered_model(name, description="aaclip anomaly detectors (`aaclip register`).")
            except Exception as exc:  # another process created it meanwhile
                if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
        version = client.create_model_version(name, model_uri, run_id=run_id, tags=tags, description=description,
                                              model_id=model_id)
        if alias:
            client.set_registered_model_alias(name, alias, version.version)
    return client.get_model_version(name, version.version)


def download_version(mlflow, version, artifact: str, dst: Path) -> Path:
    """Download the folder ``artifact`` of a registered version's model into ``dst``."""
    source = f"{MODELS_SCHEME}{version.name}/{version.version}"
    with store_call(mlflow, f"downloading {source}"):
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/artifacts/{artifact}", dst_path=str(dst))
    return Path(path)


def versions_by_run(mlflow) -> dict[str, list[str]]:
    """run id -> ["NAME/VERSION @alias ...", ...] of the versions registered from it; empty where the
    store has no registry (a listing of runs must not fail for it)."""
    try:
        client = registry_client(mlflow)
        versions = client.search_model_versions(max_results=10000)
        aliases = {m.name: m.aliases or {} for m in client.search_registered_models(max_results=1000)}
    except StoreError:
        return {}
    out: dict[str, list[str]] = {}
    for v in sorted(versions, key=lambda v: (v.name, int(v.version))):
        if not v.run_id:
            continue
        named = [f"@{a}" for a, n in sorted(aliases.get(v.name, {}).items()) if str(n) == str(v.version)]
        out.setdefault(v.run_id, []).append(" ".join([f"{v.name}/{v.version}", *named]))
    return out

