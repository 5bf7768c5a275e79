"""When all-8-bit misses the gate, a bounded search keeps the few sensitive layers at higher precision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from ai_edge_litert import schema_py_generated as schema
from onnx import TensorProto, helper, numpy_helper
from tflite_builders import make_outlier_tflite

from compiler import GateFailed, compile_model
from compiler.mixed_precision import ladder, layer_groups, rank_layers
from compiler.tflite_prep import read_tflite
from signing.keyring import KeyDir


def test_layers_are_ranked_by_the_error_they_add_not_inherit() -> None:
    nodes = [
        ("first", ["x"], ["a"]),
        ("second", ["a"], ["b"]),
        ("third", ["b"], ["c"]),
        ("shape", ["b"], ["s"]),  # not measured: left out
    ]
    noise = {"x": 0.0, "a": 0.01, "b": 0.02, "c": 0.5}
    ranked = rank_layers(nodes, noise)
    assert [name for name, _ in ranked] == ["third", "first", "second"]
    assert ranked[0][1] == pytest.approx(0.48) and ranked[2][1] == pytest.approx(0.01)


def test_a_layer_takes_the_producers_it_is_fused_with() -> None:
    """Conv -> Relu with a Q/DQ only after the Relu: keeping the Relu float must keep the Conv too;
    the walk stops at quantized tensors, graph inputs/initializers and recurrent nodes."""
    nodes = [
        ("conv", ["x", "w"], ["c"]),
        ("relu", ["c"], ["r"]),  # c is not quantized (fused), r is
        ("lstm", ["r", "wl"], ["y"]),
        ("squeeze", ["y"], ["s"]),  # y is not quantized: LSTM has no QDQ form
        ("out", ["s", "w2"], ["o"]),
    ]
    groups = layer_groups(nodes, measured={"x", "r", "s", "o"}, recurrent=frozenset({"lstm"}))
    assert groups["relu"] == ["relu", "conv"]
    assert groups["out"] == ["out"]  # its input is quantized
    assert groups["squeeze"] == ["squeeze"]  # does not swallow the recurrent layer behind it
    assert layer_groups(nodes, measured={"r", "s", "o"})["squeeze"] == ["squeeze", "lstm"]
    assert layer_groups(nodes, measured=set(), depth=1)["out"] == ["out", "squeeze"]


def test_the_ladder_doubles_up_to_a_quarter_of_the_layers() -> None:
    assert ladder(1) == [1]
    assert ladder(8) == [1, 2]
    assert ladder(53) == [1, 2, 4, 8, 14]


def outlier_model(path: Path) -> Path:
    """x [N, 16] -> MatMul -> Add (one channel shifted by 1000) -> h [N, 8] -> MatMul -> embedding [N, 4].

    One channel of ``h`` sits ~1000 above the rest and the last layer ignores it: with 8-bit
    activations the small channels of ``h`` round to steps of ~4 and the embedding is lost; 16 bits
    on ``h`` keep them. The outlier channels of real networks (transformers, some detectors) do this.
    """
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (16, 8)).astype(np.float32)
    offset = np.zeros(8, np.float32)
    offset[0] = 1000.0
    w2 = rng.normal(0, 0.5, (8, 4)).astype(np.float32)
    w2[0, :] = 0
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["m"], name="expand"),
            helper.make_node("Add", ["m", "offset"], ["h"], name="shift"),
            helper.make_node("MatMul", ["h", "w2"], ["embedding"], name="project"),
        ],
        "outlier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 4])],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(offset, "offset"),
            numpy_helper.from_array(w2, "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _compile(tmp_path: Path, keys: KeyDir, out: str, target: str = "arm64-cpu", **kw: object):
    model = outlier_model(tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).normal(size=(120, 16)).astype(np.float32))
    return compile_model(
        model,
        target=target,
        calib_path=tmp_path / "c.npz",
        out_dir=tmp_path / out,
        release_key=keys.key("release"),
        name="m",
        version="1",
        release=1,
        latency_repeats=0,
        **kw,  # type: ignore[arg-type]
    )


def test_all_8bit_is_refused_and_the_search_finds_16bit_activations(
    release_keys: KeyDir, tmp_path: Path
) -> None:
    with pytest.raises(GateFailed, match="SNR") as refused:
        _compile(tmp_path, release_keys, "plain", mixed_precision_seconds=0)
    assert refused.value.report["outputs"]["embedding"]["snr_db"] < 10
    assert "mixed_precision" not in refused.value.report

    result = _compile(tmp_path, release_keys, "mixed")
    report = result.report
    assert report["gate"]["verdict"] == "passed" and report["outputs"]["embedding"]["snr_db"] >= 20
    mixed = report["mixed_precision"]
    assert mixed["stopped"] == "passed" and any("SNR" in f for f in mixed["triggered_by"])
    assert mixed["sensitivity"][0]["layer"] == "project"  # where the error shows, not where it starts
    assert mixed["chosen"] == {"mode": "a16", "layers": ["project"], "count": 1}
    assert mixed["tries"][-1]["passed"] and mixed["judged_on"].startswith("calibration samples")
    cost = mixed["cost"]
    assert cost["size_bytes"] == result.model_path.stat().st_size and cost["size_ratio_to_8bit"] < 1.5
    assert cost["latency_ms"] > 0 and cost["latency_ms_8bit"] > 0
    # All-16-bit activations pass too, at a larger file than the one-layer mix.
    assert cost["all16_passes"] and cost["size_bytes_all16"] >= cost["size_bytes"]
    shipped = onnx.load(str(result.model_path))
    sixteen = [i for i in shipped.graph.initializer if i.data_type == TensorProto.UINT16]
    assert sixteen, "the shipped model carries 16-bit activation zero points"


def test_the_search_stops_at_its_time_budget(release_keys: KeyDir, tmp_path: Path) -> None:
    with pytest.raises(GateFailed) as refused:
        _compile(tmp_path, release_keys, "b", mixed_precision_seconds=1e-6)
    mixed = refused.value.report["mixed_precision"]
    assert mixed["stopped"] == "budget" and mixed["chosen"] is None and mixed["tries"] == []


def test_tflite_gets_16bit_activations_for_the_sensitive_op(release_keys: KeyDir, tmp_path: Path) -> None:
    """ai-edge-quantizer recipe entries per op output: int16 activations (16x8 kernels) on one op."""
    model = make_outlier_tflite(tmp_path / "m.tflite")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).normal(size=(80, 16)).astype(np.float32))

    def build(out: str, **kw: object):
        return compile_model(
            model,
            target="tflite-int8",
            calib_path=tmp_path / "c.npz",
            out_dir=tmp_path / out,
            release_key=release_keys.key("release"),
            name="m",
            version="1",
            release=1,
            latency_repeats=0,
            **kw,  # type: ignore[arg-type]
        )

    with pytest.raises(GateFailed, match="SNR"):
        build("plain", mixed_precision_seconds=0)
    result = build("mixed")
    mixed = result.report["mixed_precision"]
    assert mixed["stopped"] == "passed" and mixed["chosen"]["mode"] == "a16"
    assert mixed["chosen"]["layers"] == ["project"] and result.report["outputs"]["project"]["snr_db"] >= 20
    shipped = read_tflite(result.model_path.read_bytes())
    int16 = [t for t in shipped.subgraphs[0].tensors if t.type == schema.TensorType.INT16]
    assert int16 and mixed["cost"]["size_ratio_to_8bit"] < 1.5
    assert mixed["cost"]["all16_passes"] and mixed["cost"]["size_bytes_all16"] >= mixed["cost"]["size_bytes"]


def test_qnn_htp_searches_with_its_own_config(release_keys: KeyDir, tmp_path: Path) -> None:
    """qnn-htp: candidates from get_qnn_qdq_config with tensor overrides (it adds the u8 <-> u16
    conversions the HTP needs); the shipped model mixes uint8 and uint16 activations."""
    result = _compile(tmp_path, release_keys, "q", target="qnn-htp")
    mixed = result.report["mixed_precision"]
    assert mixed["chosen"] == {"mode": "a16", "layers": ["project"], "count": 1}
    assert result.report["outputs"]["embedding"]["snr_db"] >= 20
    types = {i.data_type for i in onnx.load(str(result.model_path)).graph.initializer}
    assert {TensorProto.UINT8, TensorProto.UINT16} <= types


def lstm_model(path: Path) -> Path:
    """x [N, steps, 8] -> Transpose -> LSTM (hidden 64) -> y [steps, 1, N, 64] and the last state.

    Static QDQ has no form for LSTM and leaves its 4 x 64 x (8 + 64) weights float; the CPU target
    then tries them as dynamic int8.
    """
    rng = np.random.default_rng(0)
    hidden, features = 64, 8
    w = rng.normal(0, 0.3, (1, 4 * hidden, features)).astype(np.float32)
    r = rng.normal(0, 0.1, (1, 4 * hidden, hidden)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2], name="time_major"),
            helper.make_node("LSTM", ["xt", "w", "r"], ["y", "h"], hidden_size=hidden, name="lstm"),
        ],
        "recurrent",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12, features])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [12, 1, "N", hidden]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "N", hidden]),
        ],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(r, "r")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_recurrent_layers_go_dynamic_int8_when_the_model_still_passes(
    release_keys: KeyDir, tmp_path: Path
) -> None:
    model = lstm_model(tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).normal(size=(40, 12, 8)).astype(np.float32))

    def build(out: str, seconds: float):
        return compile_model(
            model,
            target="arm64-cpu",
            calib_path=tmp_path / "c.npz",
            out_dir=tmp_path / out,
            release_key=release_keys.key("release"),
            name="m",
            version="1",
            release=1,
            latency_repeats=0,
            output_kinds="y=sequence:axis=0",
            mixed_precision_seconds=seconds,
        )

    static = build("static", 0)
    assert "mixed_precision" not in static.report
    assert "LSTM" in {n.op_type for n in onnx.load(str(static.model_path)).graph.node}
    result = build("dynamic", 60)
    recurrent = result.report["mixed_precision"]["recurrent"]
    assert recurrent["passed"] and recurrent["ops"] == ["LSTM"]
    ops = {n.op_type for n in onnx.load(str(result.model_path)).graph.node}
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops
    assert recurrent["size_bytes"] == result.model_path.stat().st_size
    assert recurrent["size_bytes"] < 0.5 * static.model_path.stat().st_size  # float weights were the bulk
    assert result.report["gate"]["verdict"] == "passed"


def test_ethos_u_searches_16bit_activations_and_shows_the_vela_cost(
    release_keys: KeyDir, tmp_path: Path
) -> None:
    """Ethos-U: the same 16-bit (int16x8) search, the chosen mix compiled by Vela beside the 8-bit
    model so the report shows what it costs on the NPU (SRAM, cycles, ops left on the CPU)."""
    model = make_outlier_tflite(tmp_path / "m.tflite")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).normal(size=(80, 16)).astype(np.float32))
    result = compile_model(
        model,
        target="ethos-u55-128",
        calib_path=tmp_path / "c.npz",
        out_dir=tmp_path / "e",
        release_key=release_keys.key("release"),
        name="m",
        version="1",
        release=1,
        latency_repeats=0,
    )
    report = result.report
    mixed = report["mixed_precision"]
    assert mixed["chosen"]["mode"] == "a16" and report["outputs"]["project"]["snr_db"] >= 20
    cost = mixed["vela"]
    assert cost["chosen"] == {k: report["npu"]["vela"][k] for k in cost["chosen"]}
    assert cost["8bit"]["cycles_total"] > 0 and cost["chosen"]["cycles_total"] > 0
    assert cost["chosen"]["sram_kib"] >= cost["8bit"]["sram_kib"]  # 16-bit tensors are wider
    assert report["gate"]["verdict"] == "passed"
