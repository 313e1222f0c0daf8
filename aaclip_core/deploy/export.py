"""Write a `DetectorGraph` as one file (ONNX or TorchScript) with its sidecar JSON, and the optional
dynamic int8 quantisation of the ONNX file.

ONNX goes through PyTorch's TorchScript-based exporter (``dynamo=False``): the dynamo exporter needs
onnxscript, which the project does not otherwise use. PyTorch's fused multi-head-attention fast path
(``aten::_native_multi_head_attention``) has no ONNX symbol, so export and tracing run with it off;
the traced graph computes the same attention by its ordinary ops.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from aaclip_score.contract import INPUT_NAMES, OUTPUT_NAMES, SIDECAR_SCHEMA, sidecar_of

from aaclip_core.deploy.graph import DetectorGraph
from aaclip_core.errors import ConfigError
from aaclip_core.files import atomic_path, sha256_of

OPSET = 17
FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def example_inputs(graph: DetectorGraph, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of zeros and class indices cycling over the classes (the values do not matter to the
    trace; two images keep the batch dimension from being specialised to 1)."""
    device = graph.ranges.device
    image = torch.zeros(batch, 3, graph.image_size, graph.image_size, device=device)
    index = torch.arange(batch, device=device) % len(graph.classes)
    return image, index


def export_onnx(graph: DetectorGraph, path: Path) -> Path:
    """Write the graph as one ONNX file (dynamic batch) and check it with ``onnx.checker``."""
    import onnx

    path = Path(path)
    graph.eval()
    with atomic_path(path) as tmp, _no_mha_fastpath(), torch.no_grad():
        torch.onnx.export(
            graph,
            example_inputs(graph),
            str(tmp),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: {0: "batch"} for name in (*INPUT_NAMES, *OUTPUT_NAMES)},
            do_constant_folding=True,
        )
        # By path, so a model near protobuf's 2 GB limit is checked without loading it twice.
        onnx.checker.check_model(str(tmp), full_check=True)
    return path


def export_torchscript(graph: DetectorGraph, path: Path) -> Path:
    """Trace the graph into one TorchScript file (loadable with ``torch.jit.load`` alone)."""
    path = Path(path)
    graph.eval()
    with atomic_path(path) as tmp, _no_mha_fastpath(), torch.no_grad():
        traced = torch.jit.trace(graph, example_inputs(graph), check_trace=False)
        # Frozen: the weights become constants and what the graph does not use (CLIP's text tower
        # when the anchors are baked in) is dropped from the file.
        torch.jit.save(torch.jit.freeze(traced.eval()), str(tmp))
    return path


def export_graph(graph: DetectorGraph, path: Path, fmt: str) -> Path:
    if fmt == "onnx":
        return export_onnx(graph, path)
    if fmt == "torchscript":
        return export_torchscript(graph, path)
    raise ConfigError(f"--format must be one of {', '.join(FORMATS)} (or the formats `aaclip export` lists), got '{fmt}'.")


# Only the matrix multiplications (every Linear of the backbone, adapters and cross-attention): left
# to its defaults, ONNX Runtime would also quantise the Gather tables (the anchors and the calibration
# ranges, whose int8 rounding moves image scores by up to 0.5) and the convolutions (patch embedding,
# the evaluation blur).
QUANTIZED_OPS = ("MatMul", "Gemm")


def quantize_int8(src: Path, dst: Path) -> Path:
    """Dynamic int8 quantisation (weights int8 per tensor, activations quantised on the fly) of the
    matrix multiplications of an ONNX file."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    with atomic_path(dst) as tmp:
        quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS))
    return dst


def write_sidecar(model_file: Path, info: dict) -> Path:
    """The JSON beside the model file; it records the file's sha256 so a mismatched pair is caught."""
    out = sidecar_of(model_file)
    doc = {"schema": SIDECAR_SCHEMA, "file": Path(model_file).name, "sha256": sha256_of(model_file), **info}
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return out
