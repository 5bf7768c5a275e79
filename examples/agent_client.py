"""Call the edgefleet agent's local inference API (HTTP on localhost or a Unix socket).

    python examples/agent_client.py unix:/run/edgefleet/agent.sock
    python examples/agent_client.py http://127.0.0.1:8700

Standard library only, so an on-device application can copy it as is.
Every answer names the model (sha256 + version) that produced it and carries an
inference id, which a label for that prediction refers to.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
from typing import Any
from urllib.parse import urlparse


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class AgentClient:
    """``AgentClient("unix:/run/edgefleet/agent.sock")`` or ``AgentClient("http://127.0.0.1:8700")``."""

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self.address, self.timeout = address, timeout

    def _conn(self) -> http.client.HTTPConnection:
        if self.address.startswith("unix:"):
            return _UnixConnection(self.address[5:], self.timeout)
        url = urlparse(self.address)
        return http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=self.timeout)

    def _call(self, method: str, path: str, doc: Any = None) -> Any:
        conn = self._conn()
        try:
            body = json.dumps(doc).encode() if doc is not None else None
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = json.loads(resp.read() or b"null")
        finally:
            conn.close()
        if resp.status != 200:
            err = (data or {}).get("error", {})
            raise RuntimeError(f"HTTP {resp.status} {err.get('code')}: {err.get('message')}")
        return data

    def model(self) -> dict[str, Any]:
        """What is serving: sha256, version, input shape and dtype, deployment state."""
        return dict(self._call("GET", "/v1/model"))

    def infer(self, inputs: Any) -> dict[str, Any]:
        """``inputs``: nested lists in the model's input shape -> outputs, the model that answered,
        and the ``inference_id`` to post a label for."""
        return dict(self._call("POST", "/v1/infer", {"inputs": inputs}))

    def labels(self, labels: list[dict[str, Any]]) -> dict[str, Any]:
        """``[{"inference_id", "label", "label_time"?}, ...]`` -> a status per label (matched, ...)."""
        return dict(self._call("POST", "/v1/labels", {"labels": labels}))


def main() -> None:
    client = AgentClient(sys.argv[1] if len(sys.argv) > 1 else "unix:/run/edgefleet/agent.sock")
    info = client.model()
    print("serving", info["model_version"], info["model_sha256"][:12], "input", info["input_shape"])
    shape = info["input_shape"]
    n = 1
    for d in shape:
        n *= d
    flat: Any = [0.0] * n
    # reshape the zeros into the nested list the model wants
    for d in reversed(shape[1:]):
        flat = [flat[i : i + d] for i in range(0, len(flat), d)]
    answer = client.infer(flat)
    print("answered by", answer["model_version"], answer["model_sha256"][:12], "ok", answer["ok"])
    print("outputs", answer["outputs"])
    # Later the application learns the truth and says so (here: the class the model chose).
    scores = answer["outputs"][0][0] if answer["outputs"] else []
    truth = max(range(len(scores)), key=scores.__getitem__) if isinstance(scores, list) and scores else 0
    (result,) = client.labels([{"inference_id": answer["inference_id"], "label": truth}])["results"]
    print("label for", answer["inference_id"], result["status"])


if __name__ == "__main__":
    main()
