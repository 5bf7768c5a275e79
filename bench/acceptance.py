"""The on-device acceptance check's cost: per golden sample against one inference, and its size.

A bundle compiled here (digits; PaddleOCR's text-direction classifier when ``make models``
has it cached) is loaded with the agent's runtime, and the check the agent runs before a
swap (``device_agent.reconcile.check_golden``: parse the signed golden set, one inference
per sample, the figures of each output's kind, the verdict) is timed against one inference
of the same model on the same inputs (interleaved, so both see the same machine load). It
runs once per install; its fixed part (inflating the golden file, the figures) shows on tiny
models. Target: the golden set within ``max(64 KiB, 5% of the model file)``.
"""

from __future__ import annotations

import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from compiler import compile_model
from compiler.examples import train_digits
from device_agent import acceptance
from device_agent.reconcile import check_golden
from device_agent.runtime import OnnxRuntimeFactory
from signing.keyring import KeyDir, init_keys
from signing.manifest import read_bundle

PROJECT = Path(__file__).resolve().parent.parent


def _bundles(root: Path) -> dict[str, Path]:
    init_keys(root / "keys")
    common: dict[str, Any] = {"target": "arm64-cpu", "release_key": KeyDir(root / "keys").key("release")}
    common |= {"version": "1", "release": 1, "latency_repeats": 0, "mixed_precision_seconds": 0}
    ex = train_digits(root / "digits-src")
    compile_model(
        ex.model_path,
        calib_path=ex.calib_path,
        eval_path=ex.eval_path,
        out_dir=root / "d",
        name="d",
        **common,
    )
    out = {"digits": root / "d"}
    sys.path.insert(0, str(PROJECT / "scripts"))
    cached = PROJECT / ".cache" / "models"
    if any(cached.glob("*text*")):
        import fetch_models

        from compiler.realdata import TEXT_CLS_PREPROCESS, write_text_line_folder
        from compiler.sources import Preprocess

        write_text_line_folder(root / "tc", 64, seed=0)
        write_text_line_folder(root / "te", 48, seed=1)
        model = fetch_models.fetch()["text_direction_cls"]
        pre = Preprocess.parse(TEXT_CLS_PREPROCESS)
        compile_model(
            model,
            calib_path=root / "tc",
            eval_path=root / "te",
            out_dir=root / "t",
            name="t",
            preprocess=pre,
            **common,
        )
        out["text_direction_cls"] = root / "t"
    return out


def run(repeats: int = 5) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, bundle in _bundles(Path(tmp)).items():
            manifest = read_bundle(bundle)
            spec = acceptance.Spec.from_manifest(manifest.to_dict())
            assert spec is not None
            data = (bundle / spec.file).read_bytes()
            model = OnnxRuntimeFactory().load(bundle / manifest.model_file.path, manifest.model_file.sha256)
            golden = acceptance.Golden.parse(data, spec)
            names = list(spec.outputs)
            for _ in range(5):
                acceptance.run_golden(model.run, golden, names)
            # Interleaved, so both see the same machine load: the golden inputs run bare, then the check.
            bare, checks = [], []
            for _ in range(repeats * 4):
                bare.append(_time(functools.partial(acceptance.run_golden, model.run, golden, names)))
                checks.append(_time(functools.partial(check_golden, spec, data, model)))
            one = statistics.median(bare) / spec.samples
            per_sample = statistics.median(checks) / spec.samples
            size, share = len(data), len(data) / manifest.model_file.length
            rows.append(
                {
                    "bench": f"acceptance check per golden sample ({name}, {spec.samples} samples)",
                    "baseline": "one inference (same inputs)",
                    "baseline_us": round(one * 1e6, 1),
                    "edgefleet_us": round(per_sample * 1e6, 1),
                    "ratio": round(per_sample / one, 2),
                    "target": "once per install",
                    "golden_bytes": size,
                    "model_bytes": manifest.model_file.length,
                    "golden_share": f"{share:.1%}",
                    "within_budget": size <= max(64 * 1024, 0.05 * manifest.model_file.length),
                }
            )
    return rows


def _time(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
