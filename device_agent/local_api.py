"""The local inference API for on-device applications: HTTP on localhost or a Unix socket.

Standard library only (``http.server``): a device has no room for a web
framework, and one request per connection thread is plenty for local callers.

``POST /v1/infer`` with JSON ``{"inputs": [[...], ...]}`` (nested lists, the
model's input shape) or a raw ``.npy`` body (``Content-Type:
application/x-npy``) -> ``{"outputs": [...], "ok", "error", "model_sha256",
"model_version", "inference_id"}``: every answer names the model version that
produced it, so an application can tell which side of a swap it was on, and
the UUIDv7 to post its label for.
``POST /v1/labels`` with ``{"labels": [{"inference_id", "label", "label_time"?}, ...]}``
-> ``{"results": [{"inference_id", "status", "detail"}], "counts": {status: n}}``
(at most ``MAX_LABELS`` per request, ``MAX_LABELS_BODY`` bytes; an item that is
not valid answers ``invalid`` and the rest are kept: see :mod:`device_agent.labels`).
``POST /v1/outcomes`` with ``{"inference_id", "metric", "value"}`` (or ``{"outcomes": [...]}``)
-> the same shape of results: an app's outcome metric joined to the model that made the prediction,
once per (inference, metric) (:mod:`device_agent.outcomes`).
``POST /v1/defer`` with ``{"seconds": N, "reason": "..."}`` -> ``{"deferred_until", "holds_until",
"max_deferral_seconds", "deployment_state"}``: the app is busy, so a model waiting for its
maintenance window is not swapped in for ``N`` seconds (0 withdraws), up to the rollout's
maximum deferral (``device_agent.schedule``); reported to the fleet as an event.
``GET /v1/model`` -> what is serving; ``GET /healthz`` -> ``{"status": "ok"}``; ``GET /metrics`` ->
the agent's counters, deployment state and serving model in Prometheus' text format.
Bad input -> 400 ``{"error": {"code", "message"}}``; no model yet -> 503; an
inference not answered within ``api_request_timeout_s`` -> 504 ``timeout``.

Prediction availability is counted here, per model, in telemetry: every
``/v1/infer`` request, and those that got no prediction by kind (``bad_input``,
``runtime_error``, ``non_finite``, ``timeout``). Inferences run on a small pool of
worker threads so a request can be answered ``timeout`` while a stuck model call
finishes in the background (a model call cannot be interrupted).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent import npy
from device_agent.metrics import exposition
from signing import safejson

if TYPE_CHECKING:
    from device_agent.agent import Agent


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[Any, Any]:
        sock, _ = super().get_request()
        return sock, ("unix", 0)  # BaseHTTPRequestHandler wants a (host, port) client address


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _decode_input(body: bytes, content_type: str, dtype: Any) -> np.ndarray:
    if content_type.startswith("application/x-npy"):
        try:
            return npy.array(body)
        except (ValueError, OSError, EOFError) as exc:
            raise ApiError(400, "bad_npy", f"body is not a .npy array: {exc}") from exc
    try:
        doc = safejson.loads(body)  # a local caller is still untrusted input: bounded depth
    except safejson.JsonError as exc:
        raise ApiError(400, "bad_json", f"body is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise ApiError(400, "missing_inputs", 'expected {"inputs": [[...], ...]}')
    try:
        arr = np.asarray(doc["inputs"], dtype=dtype)
    except (ValueError, TypeError) as exc:
        raise ApiError(400, "bad_inputs", f"inputs are not a numeric array of one shape: {exc}") from exc
    return arr


MAX_DEFER_BODY = 4096  # bytes per POST /v1/defer
MAX_DEFER_REASON = 200  # characters of the reason kept


def defer_request(body: bytes) -> tuple[float, str]:
    """(seconds, reason) of a ``/v1/defer`` body; ApiError naming what is wrong."""
    from device_agent.reconcile import MAX_DEFER_S

    try:
        doc = safejson.loads(body)
    except safejson.JsonError as exc:
        raise ApiError(400, "bad_json", f"body is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ApiError(400, "bad_defer", 'expected {"seconds": N, "reason": "..."}')
    unknown = sorted(set(doc) - {"seconds", "reason"})
    if unknown:
        raise ApiError(400, "bad_defer", f"unknown field(s): {', '.join(unknown)}")
    seconds, reason = doc.get("seconds"), doc.get("reason", "busy")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds <= MAX_DEFER_S:
        raise ApiError(400, "bad_seconds", f"seconds: a number from 0 to {MAX_DEFER_S:g}")
    if not isinstance(reason, str):
        raise ApiError(400, "bad_reason", "reason: a string")
    return float(seconds), reason[:MAX_DEFER_REASON]


MAX_LABELS = 1000  # labels per POST /v1/labels
MAX_LABELS_BODY = 1 << 20  # bytes per POST /v1/labels
READ_TIMEOUT_S = 30.0  # a client that stalls mid-request loses its connection, not a thread forever


def label_items(body: bytes) -> list[Any]:
    """The items of a ``/v1/labels`` body; ApiError if the body as a whole is unusable."""
    try:
        doc = safejson.loads(body)
    except safejson.JsonError as exc:
        raise ApiError(400, "bad_json", f"body is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("labels"), list):
        raise ApiError(400, "missing_labels", 'expected {"labels": [{"inference_id", "label"}, ...]}')
    items: list[Any] = doc["labels"]
    if len(items) > MAX_LABELS:
        raise ApiError(413, "too_many_labels", f"{len(items)} labels in one request; at most {MAX_LABELS}")
    return items


def outcome_items(body: bytes) -> list[Any]:
    """The items of a ``/v1/outcomes`` body: one ``{"inference_id", "metric", "value"}`` or a batch
    ``{"outcomes": [...]}`` (at most ``MAX_LABELS``); ApiError if the body as a whole is unusable."""
    try:
        doc = safejson.loads(body)
    except safejson.JsonError as exc:
        raise ApiError(400, "bad_json", f"body is not JSON: {exc}") from exc
    if isinstance(doc, dict) and "outcomes" not in doc and "inference_id" in doc:
        return [doc]
    if not isinstance(doc, dict) or not isinstance(doc.get("outcomes"), list):
        raise ApiError(
            400, "missing_outcomes", 'expected {"inference_id", "metric", "value"} or {"outcomes": [...]}'
        )
    items: list[Any] = doc["outcomes"]
    if len(items) > MAX_LABELS:
        raise ApiError(
            413, "too_many_outcomes", f"{len(items)} outcomes in one request; at most {MAX_LABELS}"
        )
    return items


def _outcome_one(agent: Agent, item: Any) -> dict[str, Any]:
    """One outcome, judged on its own (a bad item never spoils the rest)."""
    if not isinstance(item, dict):
        return {
            "inference_id": None,
            "status": "invalid",
            "detail": 'an outcome is {"inference_id", "metric", "value"}',
        }
    iid = item.get("inference_id")
    result = agent.outcome(iid, item.get("metric"), item.get("value"))
    return {
        "inference_id": iid if isinstance(iid, str) else None,
        "metric": item.get("metric") if isinstance(item.get("metric"), str) else None,
        "status": result.status.value,
        "detail": result.detail or None,
    }


def _label_one(agent: Agent, item: Any) -> dict[str, Any]:
    """One item of a ``/v1/labels`` batch, judged on its own (a bad item never spoils the rest)."""
    if not isinstance(item, dict):
        agent.telemetry.record_unmatched("invalid")
        return {"inference_id": None, "status": "invalid", "detail": 'a label is {"inference_id", "label"}'}
    iid = item.get("inference_id")
    result = agent.label(iid, item.get("label"), item.get("label_time"))
    return {
        "inference_id": iid if isinstance(iid, str) else None,
        "status": result.status.value,
        "detail": result.detail or None,
    }


def _make_handler(
    agent: Agent, max_body: int, pool: ThreadPoolExecutor, timeout: float
) -> type[BaseHTTPRequestHandler]:
    from device_agent.agent import NoModelError

    telemetry = agent.telemetry

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = READ_TIMEOUT_S  # socket timeout per request: a stalled client frees its thread

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, doc: dict[str, Any]) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, err: ApiError) -> None:
            self._send(err.status, {"error": {"code": err.code, "message": err.message}})

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._send(200, {"status": "ok"})
            elif self.path == "/metrics":
                body = exposition(
                    agent.metrics, agent.deployment_state.value, agent.running_version, agent.running_sha256
                )
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/v1/model":
                model = agent.running_model
                self._send(
                    200,
                    {
                        "model_sha256": agent.running_sha256,
                        "model_version": agent.running_version,
                        "input_shape": list(model.input_shape) if model else None,
                        "input_dtype": np.dtype(model.input_dtype).name if model else None,
                        "deployment_state": agent.deployment_state.value,
                    },
                )
            else:
                self._error(ApiError(404, "not_found", f"no route {self.path}"))

        def _body(self, limit: int) -> bytes:
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError as exc:
                raise ApiError(411, "length_required", "Content-Length is required") from exc
            if length < 0 or length > limit:
                self.close_connection = True
                raise ApiError(413, "too_large", f"body of {length} bytes exceeds {limit}")
            return self.rfile.read(length)

        def do_POST(self) -> None:
            try:
                if self.path == "/v1/infer":
                    self._infer()
                elif self.path == "/v1/labels":
                    self._labels()
                elif self.path == "/v1/outcomes":
                    self._outcomes()
                elif self.path == "/v1/defer":
                    self._defer()
                else:
                    raise ApiError(404, "not_found", f"no route {self.path}")
            except ApiError as err:
                self._error(err)

        def _defer(self) -> None:
            seconds, reason = defer_request(self._body(MAX_DEFER_BODY))
            try:
                answer = agent.defer(seconds, reason)
            except RuntimeError as exc:
                raise ApiError(503, "stopping", str(exc)) from exc
            self._send(200, answer)

        def _labels(self) -> None:
            items = label_items(self._body(min(max_body, MAX_LABELS_BODY)))
            results = [_label_one(agent, item) for item in items]
            counts: dict[str, int] = {}
            for r in results:
                counts[r["status"]] = counts.get(r["status"], 0) + 1
            self._send(200, {"results": results, "counts": counts})

        def _outcomes(self) -> None:
            items = outcome_items(self._body(min(max_body, MAX_LABELS_BODY)))
            results = [_outcome_one(agent, item) for item in items]
            counts: dict[str, int] = {}
            for r in results:
                counts[r["status"]] = counts.get(r["status"], 0) + 1
            self._send(200, {"results": results, "counts": counts})

        def _infer(self) -> None:
            body = self._body(max_body)
            s = agent.serving
            if s is None:
                raise ApiError(503, "no_model", "no model installed yet")
            model = s.model
            try:
                x = _decode_input(body, self.headers.get("Content-Type", ""), model.input_dtype)
            except ApiError:
                telemetry.record_request(s.sha256, "bad_input")
                telemetry.record_input_missing(s.sha256, s.input_name)
                raise
            try:
                work = pool.submit(agent.infer, x)
            except RuntimeError as exc:  # the pool is shut down: the agent is stopping
                raise ApiError(503, "stopping", "the agent is stopping") from exc
            try:
                result = work.result(timeout)
            except FutureTimeout as exc:
                work.cancel()  # still queued behind stuck calls: it never runs
                telemetry.record_request(s.sha256, "timeout")
                raise ApiError(504, "timeout", f"no answer within {timeout:g} s") from exc
            except NoModelError as exc:
                raise ApiError(503, "no_model", str(exc)) from exc
            telemetry.record_request(result.model_sha256, result.error)
            if result.error == "runtime_error":
                raise ApiError(
                    400,
                    "inference_failed",
                    f"the model refused input of shape {list(x.shape)}, want {list(model.input_shape)}",
                )
            self._send(
                200,
                {
                    "outputs": [o.tolist() for o in result.outputs],
                    "ok": result.ok,
                    "error": result.error,
                    "model_sha256": result.model_sha256,
                    "model_version": result.model_version,
                    "inference_id": result.inference_id,
                },
            )

    return Handler


class LocalApi:
    """Serves one agent on ``listen``: ``"host:port"`` (keep it on localhost) or ``"unix:/path"``."""

    def __init__(
        self,
        agent: Agent,
        listen: str,
        max_body: int = 16 << 20,
        *,
        timeout: float = 5.0,
        workers: int = 4,
    ) -> None:
        self.listen = listen
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="local-api-infer")
        handler = _make_handler(agent, max_body, self.pool, timeout)
        self.server: socketserver.BaseServer
        if listen.startswith("unix:"):
            path = Path(listen[5:])
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if path.is_socket():
                    path.unlink()  # a stale socket from a killed agent
            self.server = _UnixHTTPServer(str(path), handler)
            os.chmod(path, 0o660)
            self.address: str = str(path)
        else:
            host, _, port = listen.rpartition(":")
            httpd = ThreadingHTTPServer((host, int(port)), handler)
            httpd.daemon_threads = True
            self.server = httpd
            self.address = f"http://{host}:{httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, name="local-api", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.listen.startswith("unix:"):
            with contextlib.suppress(OSError):
                os.unlink(self.listen[5:])
        if self._thread is not None:
            self._thread.join(5)
        self.pool.shutdown(wait=False, cancel_futures=True)


def unix_request(path: str, method: str, url: str, body: bytes = b"", content_type: str = "") -> Any:
    """Minimal HTTP/1.1 client over a Unix socket (what the example client and tests use)."""
    import http.client

    class _Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout if isinstance(self.timeout, (int, float)) else 30)
            s.connect(path)
            self.sock = s

    conn = _Conn("localhost", timeout=30)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        conn.request(method, url, body=body or None, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()
