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

import contextlib
import io
import logging
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from compiler.errors import QuantizationError
from compiler.tflite_prep import SIGNATURE_KEY

log = logging.getLogger(__name__)


def quantize_tflite(prepared: bytes, calibration: Iterable[dict[str, np.ndarray]]) -> bytes:
    """Quantize ``prepared`` (output of ``prepare_tflite``); ``calibration`` yields one-sample feeds."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        from ai_edge_quantizer import calibrator, quantizer, recipe
        from ai_edge_quantizer.utils import qsv_utils
    except ImportError as exc:  # optional extra
        raise QuantizationError(
            f"tflite targets need ai-edge-quantizer and ai-edge-litert (extra 'tflite'): {exc}"
        ) from exc
    quant = quantizer.Quantizer(bytearray(prepared), recipe.static_wi8_ai8())
    sink = io.StringIO()
    try:
        with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            calib = calibrator.Calibrator(
                bytearray(prepared), num_threads=1, qsv_update_func=qsv_utils.min_max_update
            )
            dataset: dict[str, Any] = {SIGNATURE_KEY: list(calibration)}
            calib.calibrate(dataset, quant._recipe_manager)
            result = quant.quantize(calib.get_model_qsvs(), enable_progress_report=False)
    except Exception as exc:  # the quantizer raises ValueError/RuntimeError/KeyError on models it cannot take
        raise QuantizationError(f"ai-edge-quantizer failed: {type(exc).__name__}: {exc}") from exc
    if result.quantized_model is None:
        raise QuantizationError("ai-edge-quantizer produced no model")
    return bytes(result.quantized_model)
