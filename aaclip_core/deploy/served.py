"""The registered detector as an MLflow ``pyfunc`` model: what `aaclip register` logs and what
`mlflow models serve` (or ``mlflow.pyfunc.load_model``) runs.

This file is logged as a *model from code* (``python_model=<this file>``): MLflow copies it into the
model and executes it when the model is loaded, so nothing is pickled and the served process imports
only what this file imports: the torch-free scorer `aaclip_score` (numpy, Pillow, ONNX Runtime), which
the model ships as code (:func:`code_paths`), and ``mlflow.pyfunc``. The detector file and its
sidecar JSON are the model's artifacts.

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
from pathlib import Path

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


def code_paths() -> list[str]:
    """The code the model ships: the torch-free scorer package (`aaclip_score`), copied into the
    model's ``code/`` folder, which MLflow puts first on ``sys.path`` when it loads the model, so a
    served version runs the scorer it was registered with, whatever is installed beside it."""
    import aaclip_score

    return [str(Path(aaclip_score.__file__).parent)]


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
        from aaclip_score import Detector

        folder = Path(context.artifacts[DETECTOR_ARTIFACT])
        files = sorted(folder.glob("*.onnx"))
        if len(files) != 1:
            raise MlflowException(f"{folder} should hold one .onnx detector file, found {len(files)}.")
        self.detector = Detector.load(files[0])  # checks the file's sha256 against its sidecar

    def predict(self, context, model_input, params=None) -> list[dict]:
        from aaclip_score.errors import AaclipError

        frame = model_input
        missing = [c for c in (IMAGE_COLUMN, CLASS_COLUMN) if c not in getattr(frame, "columns", ())]
        if missing:
            raise bad_request(f"The request has no column {', '.join(missing)}: send the columns '{IMAGE_COLUMN}' "
                              f"(base64 image bytes) and '{CLASS_COLUMN}'.")
        images = [_decode(i, text) for i, text in enumerate(frame[IMAGE_COLUMN].tolist())]
        classes = frame[CLASS_COLUMN].astype(str).tolist()
        maps = bool((params or {}).get(MAPS_PARAM, False))
        try:
            scored = self.detector.score_bytes(images, classes, with_maps=maps)
        except AaclipError as exc:  # an image that cannot be decoded, a class the detector lacks
            raise bad_request(str(exc)) from None
        records = []
        for r in scored:
            record = {"score": r.score, "threshold": r.threshold, "verdict": r.verdict, "raw_score": r.raw_det}
            if maps:
                record[MAP_FIELD] = r.raw_map.tolist()
            records.append(record)
        return records


set_model(DetectorModel())
