"""Float TFLite -> full-integer TFLite (int8 in, int8 out) with ai-edge-quantizer, no TensorFlow.

The file is first made digestible (``compiler.tflite_prep``: old-schema op
codes, fp16 constants, SignatureDef). Calibration then runs the quantizer's
own ``Calibrator`` with ``qsv_utils.min_max_update`` instead of its default
0.95 moving average of per-sample ranges: the average forgets early extremes,
so activations that peak on a few samples saturate, which ruined the SNR of
some real models; plain min/max is what onnxruntime's MinMax does too. The
recipe is ``static_wi8_ai8`` (int8 per-channel weights, int8 activations);
ai-edge-quantizer leaves ops it cannot quantize (PRELU in 0.10) in float
between DEQUANTIZE/QUANTIZE pairs; ``compiler.tflite_post`` turns those PRELUs into
int8 ones afterwards, anything else stays visible in the op report.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from compiler.errors import QuantizationError
from compiler.std_streams import redirected
from compiler.tflite_prep import read_tflite

log = logging.getLogger(__name__)


def quantize_tflite(
    prepared: bytes, calibration: Iterable[dict[str, np.ndarray]], a16: Sequence[str] = ()
) -> bytes:
    """Quantize ``prepared`` (output of ``prepare_tflite``); ``calibration`` yields one-sample feeds.

    ``a16``: output tensors whose ops get 16-bit activations (int8 weights; the quantizer inserts the
    QUANTIZE ops between int8 and int16 tensors). The recipe matches an op by its output tensor's name
    (ai-edge-quantizer's op *scope*: the output names, each followed by ``;``).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        from ai_edge_quantizer import calibrator, quantizer, recipe
        from ai_edge_quantizer.utils import qsv_utils
    except ImportError as exc:  # optional extra
        raise QuantizationError(
            f"tflite targets need ai-edge-quantizer and ai-edge-litert (extra 'tflite'): {exc}"
        ) from exc
    quant = quantizer.Quantizer(bytearray(prepared), _recipe(a16) if a16 else recipe.static_wi8_ai8())
    key, by_tensor = signature_keys(prepared)
    sink = io.StringIO()
    try:
        # the quantizer prints progress; the redirects are process-wide, so taken in turn
        with redirected("stderr", sink), redirected("stdout", sink):
            calib = calibrator.Calibrator(
                bytearray(prepared), num_threads=1, qsv_update_func=qsv_utils.min_max_update
            )
            feeds = (
                {by_tensor.get(name, name): value for name, value in feed.items()} for feed in calibration
            )
            dataset: dict[str, Any] = {key: list(feeds)}
            calib.calibrate(dataset, quant._recipe_manager)
            result = quant.quantize(calib.get_model_qsvs(), enable_progress_report=False)
    except Exception as exc:  # the quantizer raises ValueError/RuntimeError/KeyError on models it cannot take
        raise QuantizationError(f"ai-edge-quantizer failed: {type(exc).__name__}: {exc}") from exc
    if result.quantized_model is None:
        raise QuantizationError("ai-edge-quantizer produced no model")
    return bytes(result.quantized_model)


def _recipe(a16: Sequence[str]) -> Any:
    from ai_edge_quantizer import recipe_manager

    manager = recipe_manager.RecipeManager()
    manager.add_static_config(regex=".*", operation_name="*", activation_num_bits=8, weight_num_bits=8)
    for name in a16:  # later entries win for the ops they match
        # An op's scope is its output names, each followed by ';' ("conv2d;"): match one exactly.
        manager.add_static_config(
            regex=f"(^|;){re.escape(name)};", operation_name="*", activation_num_bits=16, weight_num_bits=8
        )
    return manager.get_quantization_recipe()


def signature_keys(model: bytes) -> tuple[str, dict[str, str]]:
    """The first SignatureDef's key and its input keys by tensor name.

    Samples are keyed by tensor name (what LiteRT's ``get_input_details`` reports, e.g.
    ``serving_default_x:0``), but ai-edge-quantizer's calibrator runs the signature and wants the
    signature's own input keys (``x``). ``prepare_tflite`` guarantees one signature exists.
    """
    parsed = read_tflite(model)
    sig = parsed.signatureDefs[0]
    tensors = parsed.subgraphs[sig.subgraphIndex].tensors

    def text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    key = text(sig.signatureKey)
    return key, {text(tensors[e.tensorIndex].name): text(e.name) for e in sig.inputs or []}
