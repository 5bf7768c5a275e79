"""Untrusted JSON on the device, bounded: a real broker, a real agent, its real local API.

CPython's json raises RecursionError (not ValueError) on deep nesting, which escapes a
handler written to catch malformed JSON: the message would be lost without a word to
the fleet. Every such input must be a refusal with a reason, and the agent carries on.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable

from device_agent import protocol
from device_agent.agent import Agent
from signing.dsse import sign_envelope
from signing.keyring import KeyDir

from .harness import ArtifactServer, Bundle, Observer, X, sign_directive, unique_id, wait_for

DS = protocol.DeploymentState
DEEP = b"[" * 100_000 + b"]" * 100_000


def test_a_deeply_nested_directive_is_rejected_with_a_reason(
    keydir: KeyDir,
    artifacts: ArtifactServer,
    observer: Observer,
    two_bundles: tuple[Bundle, Bundle],
    running_agent: Callable[..., Agent],
) -> None:
    dev = unique_id()
    a, _ = two_bundles
    agent = running_agent(dev)
    observer.publish(dev, DEEP)
    event = observer.wait_event(dev, DS.REJECTED, seq=0)
    assert event.reason == "malformed_envelope" and "deeper" in (event.detail or "")
    rep = wait_for(lambda: [r for r in observer.reported(dev) if r.last_rejection], what="reported refusal")[
        -1
    ]
    assert rep.last_rejection is not None and rep.last_rejection.reason == "malformed_envelope"
    # signed by the fleet key but no directive inside, nested as deep: refused too, by its own reason
    inner = json.dumps(sign_envelope(DEEP, protocol.DIRECTIVE_PAYLOAD_TYPE, [keydir.key("fleet")])).encode()
    observer.publish(dev, inner)
    wait_for(
        lambda: any(e.reason == "malformed_directive" for e in observer.events(dev)),
        what="malformed_directive",
    )
    assert agent.metrics["malformed_messages"] == 2
    # the handler lives on: the next good directive installs
    observer.publish(dev, sign_directive(keydir.key("fleet"), dev, 1, artifacts.model_ref(a)))
    observer.wait_event(dev, DS.SERVING, seq=1)
    assert agent.infer(X).model_sha256 == a.sha256


def test_the_local_api_refuses_deep_json(
    keydir: KeyDir,
    artifacts: ArtifactServer,
    observer: Observer,
    two_bundles: tuple[Bundle, Bundle],
    running_agent: Callable[..., Agent],
) -> None:
    dev = unique_id()
    a, _ = two_bundles
    agent = running_agent(dev, api_listen="127.0.0.1:0")
    observer.publish(dev, sign_directive(keydir.key("fleet"), dev, 1, artifacts.model_ref(a)))
    observer.wait_event(dev, DS.SERVING, seq=1)
    body = b'{"inputs": ' + DEEP + b"}"
    req = urllib.request.Request(f"{agent.api.address}/v1/infer", data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("deep JSON was accepted")
    except urllib.error.HTTPError as err:
        assert err.code == 400
        assert json.loads(err.read())["error"]["code"] == "bad_json"
    ok = urllib.request.Request(
        f"{agent.api.address}/v1/infer", data=json.dumps({"inputs": X.tolist()}).encode(), method="POST"
    )
    with urllib.request.urlopen(ok, timeout=10) as resp:
        assert json.loads(resp.read())["model_sha256"] == a.sha256
