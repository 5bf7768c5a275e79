"""The small version of the accuracy gate bench (bench/gates.py): the gate as the engine runs it,
every tick a look, over seeded A/A and 5-point-drop rollouts."""

from __future__ import annotations

from bench.gates import ALPHA, measure


def test_the_accuracy_gate_keeps_alpha_over_every_tick_and_catches_a_five_point_drop_at_the_canary() -> None:
    m = measure(trials=40, devices=30, seed=1)
    # A/A: at most alpha, although the engine looked at the figures on every tick of every stage
    assert m["false_alarms"] <= ALPHA * m["trials"], m
    low, _ = m["false_alarm_wilson95"]
    assert low <= ALPHA
    # the same data, judged by a fixed-sample z-test on every tick, raises far more false alarms
    assert m["z_every_tick_false_alarms"] > 2 * ALPHA * m["trials"], m
    # a 5-point drop is caught, at the canary stage, before the rest of the fleet gets the model
    assert m["caught"] >= 0.9 * m["trials"] and m["caught_at_canary"] >= 0.9 * m["trials"], m
    assert m["median_labels_to_catch"] is not None and 100 <= m["median_labels_to_catch"] <= 1000
