"""aaclip-score: score images with a detector exported by ``aaclip export --format onnx``, with
numpy, Pillow and ONNX Runtime only (no torch, no MLflow, no aaclip training stack).

In memory::

    from aaclip_score import Detector
    detector = Detector.load("export/detector.onnx")     # checks the file's sha256 against its JSON
    [result] = detector.score_bytes([png_bytes], ["bottle"], with_maps=True)
    result.score, result.verdict, result.threshold, result.map

Files and folders, as ``aaclip predict --model`` does: the ``aaclip-score`` command
(`aaclip_score.cli`) or `aaclip_score.predict.predict_with_file`.

Errors a caller can cause are `aaclip_score.errors.AaclipError` subclasses (one paragraph each):
`UnreadableImage` for an image that cannot be decoded, `UnknownClass` for a class the file was not
exported for, `ConfigError` for a missing or mismatched sidecar.

This ``__init__`` imports nothing until a name is used, so ``aaclip`` can import the scorer's
option texts and errors without loading numpy or PIL.
"""

from __future__ import annotations

__all__ = ["AaclipError", "ConfigError", "DataError", "Detector", "ScoredImage", "UnknownClass", "UnreadableImage"]


def __getattr__(name: str):
    if name in ("Detector", "ScoredImage"):
        from aaclip_score import detector

        return getattr(detector, name)
    if name == "UnreadableImage":
        from aaclip_score.images import UnreadableImage

        return UnreadableImage
    if name in ("AaclipError", "ConfigError", "DataError", "UnknownClass"):
        from aaclip_score import errors

        return getattr(errors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
