"""The figures the aarch64 lane reports per model and emulated CPU, on the host (no rootfs needed):
what counts as agreement must be right before the lane's tables can be trusted."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

PROJECT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT / "scripts"))
import arm64_agreement  # noqa: E402  (a script, not a package)


def test_identical_outputs_agree_bit_for_bit_and_keep_the_hosts_snr() -> None:
    rng = np.random.default_rng(0)
    fp32 = rng.normal(size=(8, 10)).astype(np.float32)
    ref = fp32 + np.float32(0.01)
    got = arm64_agreement.compare(ref.copy(), ref, fp32)
    assert got["bit_identical"] == 1.0 and got["max_abs_diff"] == 0.0 and got["top1_agreement"] == 1.0
    assert got["snr_db_device"] == got["snr_db_reference"]


def test_a_moved_value_shows_in_every_figure() -> None:
    fp32 = np.eye(4, dtype=np.float32)
    ref = fp32.copy()
    out = ref.copy()
    out[0, 1] = 2.0  # sample 0's top class moves from 0 to 1
    got = arm64_agreement.compare(out, ref, fp32)
    assert got["bit_identical"] == 15 / 16 and got["max_abs_diff"] == 2.0
    assert got["top1_agreement"] == 0.75
    assert got["snr_db_device"] is not None and got["snr_db_device"] < got["snr_db_reference"]  # type: ignore[operator]


def test_top1_only_for_per_class_scores() -> None:
    boxes = np.zeros((2, 896, 16), dtype=np.float32)  # a detector's regressors: no classes
    assert "top1_agreement" not in arm64_agreement.compare(boxes, boxes, boxes)


def test_a_device_output_of_another_shape_is_an_error_not_a_figure() -> None:
    ref = np.zeros((2, 10), dtype=np.float32)
    with pytest.raises(ValueError, match="shape"):
        arm64_agreement.compare(np.zeros((2, 5), dtype=np.float32), ref, ref)


def test_a_folder_without_a_model_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"neither model\.tflite nor model\.onnx"):
        arm64_agreement.load(tmp_path)
