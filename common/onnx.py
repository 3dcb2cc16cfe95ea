"""Running an exported model in ONNX Runtime, and what each normalisation became in its graph (compare.port).

numpy, onnx and onnxruntime only (imported when called: the ports and folds need neither), so the report's
process runs every framework's export. The exporters are each framework's own (Backend.export_onnx).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter

import numpy as np

from .errors import in_words

# the ops a normalisation becomes when an exporter writes it out elementwise (the scratch layers' math)
ELEMENTWISE = ("Sub", "Mul", "Div", "Add", "Sqrt", "Reciprocal", "Pow", "ReduceMean")


def op_counts(model) -> dict:
    """{op type: how many nodes} in an onnx ModelProto's main graph."""
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def opset(path: str) -> int:
    """The default-domain opset the model at path is written for."""
    import onnx

    return next(o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx"))


def check(path: str) -> str:
    """onnx.checker on the model at path, in words: "passed" (with full_check: the graph's declared shapes agree
    with ONNX's shape inference), or what fails. Raises nothing: ONNX Runtime may still run a model that fails."""
    import onnx

    try:
        onnx.checker.check_model(path)
    except Exception as exc:  # the checker's own message
        return f"fails: {in_words(exc, 120, named=False)}"
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as exc:
        return f"passes, but not with full_check (shape inference): {in_words(exc, 120, named=False)}"
    return "passed"


def run(path: str, images: np.ndarray, layout: str, optimize: bool, batch_size: int = 1000) -> tuple:
    """(the logits of images, NCHW, through the model at path in ONNX Runtime on the CPU, its graph's op counts
    after ONNX Runtime's own rewriting): with `optimize` every graph optimisation (ORT_ENABLE_ALL: constant
    folding, BatchNormalization into Conv, activation fusion), without it none. Its
    first input takes the images in `layout` ("NCHW" or "NHWC")."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = os.cpu_count() or 1
    options.log_severity_level = 3  # errors only: its warnings about serialising the optimised graph are not ours
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        ops = op_counts(onnx.load(options.optimized_model_filepath))
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ValueError(
            f"the exported graph takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}), not the images alone"
        )
    dtype = np.float64 if "double" in inputs[0].type else np.float32
    logits = [session.run(None, {inputs[0].name: x})[0] for x in batches(images, layout, dtype, batch_size)]
    return np.concatenate(logits), ops


def batches(images: np.ndarray, layout: str, dtype, batch_size: int):
    """images (NCHW) as an exported model's input takes them: in `layout` ("NCHW" or "NHWC"), `dtype`, contiguous,
    `batch_size` at a time."""
    x = images.transpose(0, 2, 3, 1) if layout == "NHWC" else images
    for i in range(0, len(x), batch_size):
        yield np.ascontiguousarray(x[i : i + batch_size], dtype=dtype)
