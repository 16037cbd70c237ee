"""The ONNX a TensorRT engine is built from, per precision: FP32 as exported, FP16 converted here, INT8 Q/DQ.

TensorRT builds strongly typed networks (the only kind TensorRT 11 has; TensorRT 10 has them too), so the
precision lives in the ONNX file, not in builder flags: FP16 is the FP32 model converted to FP16 with its
input and output types kept (the backbone's uint8 pixels go straight into a Cast to FP16), INT8 is a Q/DQ
model (explicit quantization) calibrated once on real photos, the same file the INT8 CPU profile serves. Both
are checked here, on the CPU, before any GPU sees them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from piaa_export.exceptions import ExportError, ParityError

FP16_ONNX_MIN_COSINE = 0.999
"""FP16 ONNX vs FP32 ONNX (ONNX Runtime, CPU): every output row's cosine similarity must reach this."""


def min_row_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """The smallest cosine similarity between matching rows (flattened per batch item)."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = candidate.reshape(len(candidate), -1).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(cos.min())


def run_onnx(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of an ONNX model on the CPU (ONNX Runtime), by name."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def compare(reference: dict[str, np.ndarray], got: dict[str, np.ndarray], floor: float) -> dict[str, Any]:
    """Per-output max |difference| and min row cosine; raises ParityError when an output is missing or any
    row's cosine is below `floor`."""
    missing = sorted(set(reference) - set(got))
    if missing:
        raise ParityError(f"outputs missing from the candidate: {missing}")
    report = {
        name: {
            "max_abs_diff": float(np.max(np.abs(reference[name] - got[name]))),
            "min_cosine": min_row_cosine(reference[name], got[name]),
        }
        for name in reference
    }
    bad = {k: v for k, v in report.items() if v["min_cosine"] < floor}
    if bad:
        raise ParityError(f"cosine below {floor} for {bad}")
    return {"cosine_floor": floor, "outputs": report}


def to_fp16(source: Path, target: Path, check_inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Writes the FP32 model `source` as an FP16 model with the same input and output types to `target`.

    The converted model is compared with the source on `check_inputs` (ONNX Runtime, CPU) before it is
    returned: every output row's cosine ≥ FP16_ONNX_MIN_COSINE. Returns that comparison. Raises ParityError.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    # The converter appends the input casts after the nodes that read them; TensorRT's parser (and the ONNX
    # checker) take only topologically sorted graphs.
    topological_sort(model.graph)
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    try:
        return compare(run_onnx(source, check_inputs), run_onnx(target, check_inputs), FP16_ONNX_MIN_COSINE)
    except ParityError as err:
        target.unlink()
        raise ParityError(f"FP16 conversion of {source.name}: {err}") from None


def topological_sort(graph: Any) -> None:
    """Reorders a graph's nodes (in place) so that each comes after the nodes producing its inputs.

    Raises ExportError when the graph has a cycle or reads a tensor nothing produces.
    """
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        runnable = [n for n in pending if all(i in ready for i in n.input)]
        if not runnable:
            unknown = sorted({i for n in pending for i in n.input} - ready)[:5]
            raise ExportError(f"the graph cannot be ordered: inputs {unknown} are never produced")
        for node in runnable:
            ordered.append(node)
            ready.update(node.output)
        pending = [n for n in pending if n not in runnable]
    del graph.node[:]
    graph.node.extend(ordered)


def check_qdq(path: Path) -> int:
    """Checks that an ONNX model is quantized the way TensorRT's explicit quantization takes it.

    TensorRT reads Q/DQ pairs with signed INT8 and zero points of 0 (symmetric); ONNX Runtime's default
    static quantization writes unsigned activations with zero points, which TensorRT refuses. Returns the
    number of QuantizeLinear nodes; raises ExportError saying what to change.
    """
    import onnx
    from onnx import numpy_helper

    if not path.is_file():
        raise ExportError(f"{path}: no Q/DQ model there (the INT8 profile's calibration writes it)")
    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    if not quantize:
        raise ExportError(
            f"{path.name} has no QuantizeLinear node: it is not a Q/DQ (explicitly quantized) model"
        )
    for node in (n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")):
        if len(node.input) < 3 or not node.input[2]:
            continue  # no zero point: int8 and 0 by the ONNX default
        zero_point = initializers.get(node.input[2])
        if zero_point is None:
            raise ExportError(f"{path.name}: zero point {node.input[2]!r} of {node.name} is not a constant")
        value = numpy_helper.to_array(zero_point)
        if value.dtype != np.int8 or np.any(value != 0):
            raise ExportError(
                f"{path.name}: {node.name} has a {value.dtype} zero point {value.ravel()[:4]}; "
                "TensorRT takes symmetric signed INT8 (quantize with activation_type=QInt8, "
                "weight_type=QInt8, extra_options ActivationSymmetric=True, WeightSymmetric=True)"
            )
    return len(quantize)
