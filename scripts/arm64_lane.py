"""``make test-arm64``: the device agent on a real aarch64 userland, under qemu-user emulation.

Three parts, each reported with its wall time:

1. **agent tests**: the agent's pure-core and runtime tests (those that need only the agent
   extra: deployment table, judgement, probation verdict, wire, reasons, ids, acceptance, the
   shell over the in-memory link and fetcher with real onnxruntime) run inside the rootfs;
2. **int8 agreement**: the project's models are compiled on this host (digits, trained here;
   PaddleOCR's text-direction classifier from ``make models`` when the registry is reachable,
   both for arm64-cpu; MediaPipe's hand_recrop and face detector for tflite-int8, run on LiteRT),
   and each runs inside on the agent's runtime for several emulated CPUs (``QEMU_CPU``:
   cortex-a53 and -a72 (NEON), neoverse-n1 (``udot``), max (SVE, ``i8mm``)); its outputs are
   compared with the host's QDQ reference outputs the compiler's gate judged (ONNX), or with
   the agent's own LiteRT path on this x86 host (TFLite: what differs is XNNPACK's kernels);
3. **rollout**: ``tests/arm64`` on this host: the x86 fleet server on loopback, the
   project's TLS Mosquitto, and an agent process in the arm64 userland that the server
   updates (``EDGEFLEET_ARM64_ROOTFS`` tells those tests where the rootfs is); and the
   acceptance check of a bundle the host gate passed, refused on an AVX2-only x86 CPU
   (``qemu-x86_64 -cpu Haswell-noTSX``).

Exit 77 with the reason when the lane cannot run here (``arm64_rootfs.CannotRun``). The
figures go to ``.cache/arm64-lane.json`` (docs/benchmarks.md quotes them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import arm64_rootfs as rootfs

PROJECT = rootfs.PROJECT
CPUS = ("cortex-a53", "cortex-a72", "neoverse-n1", "max")
AGENT_TESTS = (
    "tests/agent/test_deployment.py",
    "tests/agent/test_judgement.py",
    "tests/agent/test_probation_verdict.py",
    "tests/agent/test_wire.py",
    "tests/agent/test_reasons.py",
    "tests/agent/test_ids.py",
    "tests/agent/test_acceptance.py",
    "tests/agent/test_shell.py",
)
SAMPLES = 64
# The MediaPipe models compiled for tflite-int8, and the side of their square input. Few samples:
# one 256x256 invocation costs seconds under emulation, and the lane runs each on every CPU.
TFLITE_MODELS = {"hand_recrop": 256, "face_detection_short_range": 128}
TFLITE_SAMPLES = 8
# ``max`` advertises SME, and under qemu 7.2 XNNPACK's output there is garbage while ``max`` with
# SME off is bit-identical to x86 (docs/benchmarks.md): both are run, so the figures show it.
TFLITE_CPUS = (*CPUS, "max,sme=off")
TFLITE_CALIBRATION = 32
ACCEPTANCE_TESTS = "tests/agent/test_acceptance.py"  # its arm64-marked test: an AVX2-only x86 under qemu
REPORT = PROJECT / ".cache" / "arm64-lane.json"


def _say(message: str) -> None:
    print(message, flush=True)


def agent_tests(root: Path) -> dict[str, Any]:
    started = time.perf_counter()
    argv = ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *AGENT_TESTS]
    done = rootfs.run_inside(root, argv, env={"TMPDIR": "/tmp", "EDGEFLEET_EMULATED": "1"})
    return {"returncode": done.returncode, "seconds": round(time.perf_counter() - started, 1)}


# -- agreement ------------------------------------------------------------------------------------


def compile_models(work: Path) -> dict[str, tuple[Path, Path, Path, str | None]]:
    """Compile the project's models for arm64-cpu on this host.

    {name: (bundle dir, float model, held-out data, preprocessing)}."""
    from compiler import compile_model
    from compiler.examples import train_digits
    from signing.keyring import KeyDir, init_keys

    init_keys(work / "keys")
    key = KeyDir(work / "keys").key("release")
    common: dict[str, Any] = {"target": "arm64-cpu", "release_key": key, "version": "1", "release": 1}
    common |= {"latency_repeats": 0, "mixed_precision_seconds": 0}
    ex = train_digits(work / "digits-src")
    compile_model(
        ex.model_path,
        calib_path=ex.calib_path,
        eval_path=ex.eval_path,
        out_dir=work / "digits",
        name="digits",
        **common,
    )
    out: dict[str, tuple[Path, Path, Path, str | None]] = {
        "digits": (work / "digits", ex.model_path, ex.eval_path, None)
    }
    try:
        sys.path.insert(0, str(PROJECT / "scripts"))
        import fetch_models

        from compiler.realdata import TEXT_CLS_PREPROCESS, write_text_line_folder
        from compiler.sources import Preprocess

        model = fetch_models.fetch()["text_direction_cls"]
        write_text_line_folder(work / "text_calib", 64, seed=0)
        write_text_line_folder(work / "text_eval", 48, seed=1)
        compile_model(
            model,
            calib_path=work / "text_calib",
            eval_path=work / "text_eval",
            out_dir=work / "text_direction_cls",
            name="text_direction_cls",
            preprocess=Preprocess.parse(TEXT_CLS_PREPROCESS),
            **common,
        )
        out["text_direction_cls"] = (
            work / "text_direction_cls",
            model,
            work / "text_eval",
            TEXT_CLS_PREPROCESS,
        )
    except Exception as exc:  # the registry away: the lane still judges digits, and says so
        _say(f"text_direction_cls left out: {exc}")
    return out


def compile_tflite_models(work: Path) -> dict[str, tuple[Path, Path, Path]]:
    """Compile the MediaPipe models for tflite-int8 on this host, as tests/compiler compiles them.

    {name: (bundle dir, float model, held-out .npz)}; none when the registry is away. The face
    detector is compiled without the gate (its score logits lose ~10 dB at 8 bits and the
    default gate refuses it: docs/compiler.md); the lane asks what ARM computes, not whether to ship.
    """
    import numpy as np

    from compiler import compile_model
    from compiler.pipeline import DEFAULT_GATE
    from compiler.realdata import photo_crops
    from signing.keyring import KeyDir

    try:
        sys.path.insert(0, str(PROJECT / "scripts"))
        import fetch_models

        models = fetch_models.fetch()
    except Exception as exc:  # the registry away: the lane still judges the ONNX models, and says so
        _say(f"TFLite models left out: {exc}")
        return {}
    key = KeyDir(work / "keys").key("release")
    out: dict[str, tuple[Path, Path, Path]] = {}
    for name, side in TFLITE_MODELS.items():
        calib, held = work / f"{name}_calib.npz", work / f"{name}_eval.npz"
        np.savez(calib, x=photo_crops(TFLITE_CALIBRATION, side, side, seed=0))
        np.savez(held, x=photo_crops(TFLITE_SAMPLES, side, side, seed=1))
        compile_model(
            models[name],
            target="tflite-int8",
            calib_path=calib,
            eval_path=held,
            out_dir=work / name,
            name=name,
            release_key=key,
            version="1",
            release=1,
            latency_repeats=0,
            gate=None if name == "face_detection_short_range" else DEFAULT_GATE,
        )
        out[name] = (work / name, models[name], held)
    return out


def tflite_reference_data(bundle: Path, fp32_model: Path, held: Path, into: Path) -> dict[str, Any]:
    """Write model.tflite and data.npz (inputs, the host's int8 and fp32 outputs) into ``into``.

    Both host runs go through the agent's own :class:`LiteRtFactory`, the code the device runs, so
    the device's figures differ from these by the CPU's kernels alone (XNNPACK's x86 ones here)."""
    import shutil

    import numpy as np

    from device_agent.runtime import LiteRtFactory
    from signing.manifest import read_bundle

    manifest = read_bundle(bundle)
    into.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle / manifest.model_file.path, into / "model.tflite")
    with np.load(held) as data:
        x = data["x"]
    factory = LiteRtFactory()
    int8 = factory.load(into / "model.tflite", "host", target="tflite-int8")
    fp32 = factory.load(fp32_model, "host", target="tflite")
    names = [d["name"] for d in int8.interpreter.get_output_details()]
    arrays: dict[str, Any] = {"x": x}
    for label, model in (("int8", int8), ("fp32", fp32)):
        rows = [model.run(x[i : i + 1]) for i in range(len(x))]
        for j, o in enumerate(names):
            arrays[f"{label}:{o}"] = np.concatenate([r[j] for r in rows], axis=0)
    np.savez(into / "data.npz", **arrays)
    report = manifest.quantization
    gate = report.get("gate")
    return {
        "samples": len(x),
        "compiled_snr_db": {k: v.get("snr_db") for k, v in report["outputs"].items()},
        "compiled_top1": {k: v.get("top1_agreement") for k, v in report["outputs"].items()},
        "gate": gate.get("verdict") if isinstance(gate, dict) else gate,  # a dict, or why none ran
        "golden_bytes": (report.get("acceptance") or {}).get("bytes"),
        "model_bytes": manifest.model_file.length,
    }


def held_out(fp32_model: Path, source: Path, preprocess: str | None) -> Any:
    """The model's held-out inputs as the compile read them (an .npz, or an image folder)."""
    import onnx

    from compiler.signature import io_signature
    from compiler.sources import Preprocess, load_source

    sig = io_signature(onnx.load(str(fp32_model), load_external_data=False))
    pre = Preprocess.parse(preprocess) if preprocess else None
    samples = load_source(source, sig.inputs, pre)
    return samples.inputs[sig.inputs[0].name][:SAMPLES]


def reference_data(bundle: Path, fp32_model: Path, x: Any, into: Path) -> dict[str, Any]:
    """Write model.onnx and data.npz (inputs, host QDQ-reference int8 and fp32 outputs) into ``into``."""
    import shutil

    import numpy as np

    from compiler.evaluate import session
    from signing.manifest import read_bundle

    manifest = read_bundle(bundle)
    into.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle / manifest.model_file.path, into / "model.onnx")
    int8 = session(bundle / manifest.model_file.path, reference=True)
    fp32 = session(fp32_model)
    name = int8.get_inputs()[0].name
    outs = [o.name for o in int8.get_outputs()]
    arrays: dict[str, Any] = {"x": x}
    for label, sess in (("int8", int8), ("fp32", fp32)):
        rows = [sess.run(outs, {name: x[i : i + 1]}) for i in range(len(x))]
        for j, o in enumerate(outs):
            arrays[f"{label}:{o}"] = np.concatenate([r[j] for r in rows], axis=0)
    np.savez(into / "data.npz", **arrays)
    report = manifest.quantization
    return {
        "samples": len(x),
        "compiled_snr_db": {k: v.get("snr_db") for k, v in report["outputs"].items()},
        "compiled_top1": {k: v.get("top1_agreement") for k, v in report["outputs"].items()},
        "golden_bytes": (report.get("acceptance") or {}).get("bytes"),
        "model_bytes": manifest.model_file.length,
    }


def agreement(root: Path, work: Path) -> dict[str, Any]:
    import shutil

    started = time.perf_counter()
    lane = root / "tmp" / "edgefleet-lane"
    shutil.rmtree(lane, ignore_errors=True)
    prepared: dict[str, dict[str, Any]] = {}
    for name, (bundle, fp32_model, source, pre) in compile_models(work).items():
        prepared[name] = reference_data(bundle, fp32_model, held_out(fp32_model, source, pre), lane / name)
    for name, (bundle, fp32_model, held) in compile_tflite_models(work).items():
        prepared[name] = tflite_reference_data(bundle, fp32_model, held, lane / name)
    results: dict[str, Any] = {}
    for name, info in prepared.items():
        per_cpu: dict[str, Any] = {}
        for cpu in TFLITE_CPUS if (lane / name / "model.tflite").is_file() else CPUS:
            t0 = time.perf_counter()
            script = ["python", f"{rootfs.SRC}/scripts/arm64_agreement.py", f"/tmp/edgefleet-lane/{name}"]
            done = rootfs.run_inside(root, script, cpu=cpu, capture_output=True)
            if done.returncode != 0:
                per_cpu[cpu] = {"error": done.stderr.strip()[-500:]}
                _say(f"{name} on {cpu}: FAILED {per_cpu[cpu]['error']}")
                continue
            found = json.loads(done.stdout.strip().splitlines()[-1])
            per_cpu[cpu] = found | {"seconds": round(time.perf_counter() - t0, 1)}
            _say(f"{name} on {cpu}: {json.dumps(found['outputs'])}")
        results[name] = info | {"cpus": per_cpu}
    return {"models": results, "seconds": round(time.perf_counter() - started, 1)}


# -- rollout --------------------------------------------------------------------------------------


def rollout(root: Path) -> dict[str, Any]:
    started = time.perf_counter()
    env = {**os.environ, "EDGEFLEET_ARM64_ROOTFS": str(root)}
    argv = [sys.executable, "-m", "pytest", "-q", "-rP", "-m", "arm64", "tests/arm64", ACCEPTANCE_TESTS]
    done = subprocess.run(argv, cwd=PROJECT, env=env)
    return {"returncode": done.returncode, "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("tests", "agreement", "rollout"), action="append")
    args = parser.parse_args(argv)
    parts = args.only or ["tests", "agreement", "rollout"]
    started = time.perf_counter()
    try:
        rootfs.ensure_host()
    except rootfs.CannotRun as exc:
        print(f"arm64 lane skipped: {exc}", file=sys.stderr)
        return rootfs.EXIT_CANNOT
    t0 = time.perf_counter()
    root = rootfs.build()
    summary: dict[str, Any] = {"rootfs_seconds": round(time.perf_counter() - t0, 1), "rootfs": str(root)}
    if "tests" in parts:
        _say("== agent tests (aarch64, QEMU_CPU=max)")
        summary["tests"] = agent_tests(root)
    if "agreement" in parts:
        _say("== int8 agreement per emulated CPU")
        with tempfile.TemporaryDirectory(prefix="edgefleet-arm64-") as tmp:
            summary["agreement"] = agreement(root, Path(tmp))
    if "rollout" in parts:
        _say("== rollout: x86 server -> arm64 agent")
        summary["rollout"] = rollout(root)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(summary, indent=2))
    failed = [p for p in ("tests", "rollout") if summary.get(p, {}).get("returncode", 0) != 0]
    errors = [
        f"{m}@{c}"
        for m, r in summary.get("agreement", {}).get("models", {}).items()
        for c, v in r["cpus"].items()
        if "error" in v
    ]
    _say(f"arm64 lane: {summary['seconds']} s; failed: {', '.join(failed + errors) or 'none'}")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
