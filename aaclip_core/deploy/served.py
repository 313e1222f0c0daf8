"""The registered detector as an MLflow ``pyfunc`` model: what `aaclip register` logs and what
`mlflow models serve` (or ``mlflow.pyfunc.load_model``) runs.

This file is logged as a *model from code* (``python_model=<this file>``): MLflow copies it into the
model and executes it when the model is loaded, so nothing is pickled and the served process imports
only what this file imports: numpy, Pillow and ONNX Runtime through the torch-free scorer, and
``mlflow.pyfunc``. The detector file and its sidecar JSON are the model's artifacts.

Request: a table with a base64-encoded image column ``image`` and a class-name column ``class_name``
(one row per image); the parameter ``maps`` (bool, default false) asks for each image's anomaly map.
Response: one record per image: ``score`` (on the calibration's scale, as `aaclip predict` reports
it), ``threshold`` (the calibration's F1-optimal one, null for an uncalibrated class), ``verdict``
(anomalous / normal, null without a threshold), ``raw_score`` and, on request, ``map`` (the raw map,
as `aaclip predict --save-maps` writes it). An image that cannot be decoded or a class the detector
does not know is an ``MlflowException`` with ``INVALID_PARAMETER_VALUE``: the scoring server answers
HTTP 400 with the one-paragraph message, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

# The model's artifact key: the folder holding the detector file and its sidecar JSON.
DETECTOR_ARTIFACT = "detector"
IMAGE_COLUMN = "image"
CLASS_COLUMN = "class_name"
MAPS_PARAM = "maps"
RESPONSE_FIELDS = ("score", "threshold", "verdict", "raw_score")
MAP_FIELD = "map"
# What the served model needs installed (its pip requirements; `aaclip register` pins the versions
# installed where it runs): no torch, no open_clip, no training stack.
SERVED_REQUIREMENTS = ("mlflow-skinny", "numpy", "pandas", "pillow", "onnxruntime")


def _scorer():
    """The torch-free scorer: numpy, Pillow and ONNX Runtime only."""
    from aaclip_core.deploy import scorer

    return scorer


def code_paths() -> list[str]:
    """The code the model ships beside this file (MLflow puts it on ``sys.path`` when loading)."""
    return []


def signature():
    """The request and response this model declares (mlflow.models.ModelSignature)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", IMAGE_COLUMN), ColSpec("string", CLASS_COLUMN)])
    outputs = Schema([ColSpec("double", "score"), ColSpec("double", "threshold", required=False),
                      ColSpec("string", "verdict", required=False), ColSpec("double", "raw_score"),
                      ColSpec(Array(Array("float")), MAP_FIELD, required=False)])
    params = ParamSchema([ParamSpec(MAPS_PARAM, "boolean", False)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def bad_request(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 and ``message``, without a traceback."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _decode(row: int, text) -> bytes:
    try:
        return base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"Row {row}: the '{IMAGE_COLUMN}' value is not base64 text. Send each image file's bytes "
                          "base64-encoded (e.g. `base64 -w0 image.png`).") from None


class DetectorModel(PythonModel):
    """An exported aaclip detector behind MLflow's pyfunc interface."""

    # The request is validated against the declared signature (`signature`), not type hints: this
    # MLflow attribute keeps predict unwrapped and its "add type hints" warning off every load.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        folder = Path(context.artifacts[DETECTOR_ARTIFACT])
        files = sorted(folder.glob("*.onnx"))
        if len(files) != 1:
            raise MlflowException(f"{folder} should hold one .onnx detector file, found {len(files)}.")
        self.detector = _scorer().load_detector(files[0])  # checks the file's sha256 against its sidecar

    def _inputs(self, rows: list[tuple[str, str]]) -> np.ndarray:
        scorer = _scorer()
        known = self.detector.classes
        arrays = []
        for i, (image, class_name) in enumerate(rows):
            if class_name not in known:
                raise bad_request(f"Row {i}: this detector has no class {class_name!r} (it has: {', '.join(known)}); "
                                  f"send one of these in '{CLASS_COLUMN}'.")
            data = _decode(i, image)
            try:
                x, _ = self.detector.preprocess(io.BytesIO(data))
            except scorer.DataError as exc:
                reason = getattr(exc.__cause__, "reason", None) or str(exc)
                raise bad_request(f"Row {i}: the image cannot be decoded ({reason}). Send the bytes of a PNG, JPEG "
                                  "or other image file PIL reads, base64-encoded.") from None
            arrays.append(x)
        return np.stack(arrays)

    def predict(self, context, model_input, params=None) -> list[dict]:
        frame = model_input
        missing = [c for c in (IMAGE_COLUMN, CLASS_COLUMN) if c not in getattr(frame, "columns", ())]
        if missing:
            raise bad_request(f"The request has no column {', '.join(missing)}: send the columns '{IMAGE_COLUMN}' "
                              f"(base64 image bytes) and '{CLASS_COLUMN}'.")
        rows = list(zip(frame[IMAGE_COLUMN].tolist(), frame[CLASS_COLUMN].astype(str).tolist()))
        if not rows:
            return []
        classes = [c for _, c in rows]
        out = self.detector.score(self._inputs(rows), classes)
        maps = bool((params or {}).get(MAPS_PARAM, False))
        records = []
        for j, class_name in enumerate(classes):
            score = float(out["score"][j])
            threshold = self.detector.threshold(class_name)
            record = {
                "score": score,
                "threshold": threshold,
                "verdict": None if threshold is None else ("anomalous" if score >= threshold else "normal"),
                "raw_score": float(out["raw_det"][j]),
            }
            if maps:
                record[MAP_FIELD] = np.asarray(out["raw_map"][j], dtype=np.float32).tolist()
            records.append(record)
        return records


set_model(DetectorModel())
