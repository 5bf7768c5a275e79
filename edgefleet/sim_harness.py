"""The infrastructure of a scenario run: keys, model bundles, broker, fleet server, artifact proxy.

Lives in ``edgefleet/`` because it starts the server and the compiler, which the
simulator may not import (DESIGN.md's import rules); the simulator sees it only
through :class:`simulator.runner.Harness`.

- The broker is a real Mosquitto running the production configuration
  (``edgefleet.broker.start_secure_broker``: TLS, per-device identity, the ACL,
  the server listener, persistence), so a restart keeps retained directives and
  the server's session, and every device authenticates as itself: client
  certificates by default (``broker_auth="mtls"``: issued once per fleet, no
  broker reload), or passwords (``"password"``: one password-file rewrite and
  one reload for the whole fleet). ``broker_auth="insecure-dev"`` runs the open
  development broker instead (labelled as such in the run's figures).
- The server's ``public_url`` is the fault-injecting HTTP proxy, so the signed
  directives point every download through it.
- The server runs in its own process by default (``server_mode="process"``):
  1,000 agents and the server in one interpreter fight over one GIL, and the
  server then answers downloads too slowly for the agents' timeouts, which
  measures the simulator, not the product. ``"thread"`` keeps it in-process.
- A server restart terminates the server and starts a new one on the same port
  and database; the new process is spawned and has imported the server *before*
  the old one stops, so the server is away for ``down_seconds`` plus its
  startup (~0.5 s), not plus the ~2-4 s of Python imports on a loaded machine.
  A broker restart terminates Mosquitto (it saves its database on SIGTERM) and
  starts it again on the same port.
- ``[fleet] broker_shards = N`` runs N such brokers from one fleet CA
  (``edgefleet.broker.start_secure_shards``): each device on the shard its id
  hashes to (``fleet_server.shards.assign``, as provisioning and registration
  place it), the server on every one (``mqtt_shards``). A shard can be
  stopped (or killed: SIGKILL, nothing saved) and started again on its own.
- ``model_cache``: a directory where the keys, the signed bundles and the sample
  inputs of the scenario's models are kept after the first build; later runs
  with the same models skip the compiler (and its memory) entirely.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import SecretStr

from device_agent.config import BrokerInfo
from simulator.netem import HttpFaultProxy, NetworkThread
from simulator.runner import RunResult, ScenarioRun
from simulator.scenario import NGINX_MIRROR, Scenario, load_scenario

log = logging.getLogger(__name__)

# Concurrent requests the artifact proxy lets through to the server, as an nginx in front of
# it would. Unbounded, ~50+ simultaneous downloads stall the server until every one times out
# (measured: 100 concurrent GETs of a 5 KB artifact, 0 answered within 30 s).
ARTIFACT_CONCURRENCY = 32
BROKER_MODES = ("mtls", "password", "insecure-dev")


@dataclass
class RunOutcome:
    result: RunResult
    report: dict[str, Path]
    workdir: Path


class SimHarness:
    """Start with :meth:`start`, end with :meth:`close` (or use it as a context manager)."""

    def __init__(
        self,
        scenario: Scenario,
        workdir: Path,
        database_url: str | None = None,
        server_mode: str = "process",
        model_cache: Path | None = None,
        broker_auth: str = "mtls",
    ) -> None:
        if server_mode not in ("process", "thread"):
            raise ValueError(f"server_mode must be 'process' or 'thread', got {server_mode!r}")
        if broker_auth not in BROKER_MODES:
            raise ValueError(f"broker_auth must be one of {', '.join(BROKER_MODES)}, got {broker_auth!r}")
        self.server_mode = server_mode
        self.broker_auth = broker_auth
        self.scenario = scenario
        self.workdir = Path(workdir)
        self.database_url = database_url
        self.model_cache = Path(model_cache) if model_cache else None
        self.model_shas: dict[str, str] = {}
        self.model_refs: dict[str, str] = {}
        self.sample_inputs: np.ndarray | None = None
        self.net = NetworkThread()
        self.artifact_proxy: HttpFaultProxy
        self.broker: BrokerInfo
        self.server_url = ""
        # The scenario's operator token: the server requires one on its admin API.
        self.admin_token = "ef_" + secrets.token_urlsafe(32)
        self.trust_path = self.workdir / "keys" / "trust.json"
        # Devices are provisioned with the TUF root: installs go through release metadata.
        self.tuf_root_path: Path | None = self.workdir / "keys" / "root.json"
        self._broker_handle: Any = None
        self.shard_names = scenario.fleet.shard_names
        self._shards: Any = None  # edgefleet.broker.ShardedBrokers with more than one shard
        self._server: Any = None
        self._settings: Any = None
        self._server_port = 0
        self._port_holder: ServerPort | None = None  # the port the servers serve on
        self._bundles: dict[str, Path] = {}
        self.mirror_url = ""  # the nginx mirror, when the fleet lists one (FleetSpec.mirrors)
        self._nginx: Any = None

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> SimHarness:
        """Build the models, start broker, artifact proxy and server, push the models. On any
        failure, what was started is stopped again (a leaked broker would outlive the run)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._build_models()
            if len(self.shard_names) > 1:
                self._start_shards()
            else:
                self._broker_handle = self._start_broker(None)
                self.broker = self._broker_handle.info
            # held by this process for every server that serves on it (thread or child), so no
            # other process can take it, even while the server restarts
            self._port_holder = ServerPort()
            self._server_port = self._port_holder.port
            self.artifact_proxy = HttpFaultProxy(
                "127.0.0.1", self._server_port, seed=self.scenario.seed, max_upstream=ARTIFACT_CONCURRENCY
            )
            self.net.run(self.artifact_proxy.start())
            self._start_server()
            self._push_models()
            if NGINX_MIRROR in self.scenario.fleet.mirrors:
                from edgefleet.nginx import start_nginx

                # the server published its repository and the bundles there as it took them
                self._nginx = start_nginx(self._server_settings().mirror_dir, workers=2)
                self.mirror_url = self._nginx.url
        except BaseException:
            self.close()
            raise
        return self

    def mirror_requests(self) -> int:
        """Requests the nginx mirror answered so far (its access log); 0 without one."""
        return len(self._nginx.requests()) if self._nginx is not None else 0

    def close(self) -> None:
        if self._nginx is not None:
            with contextlib.suppress(Exception):
                self._nginx.stop()
            self._nginx = None
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.stop()
            self._server = None
        if self._port_holder is not None:
            self._port_holder.close()
            self._port_holder = None
        if self._broker_handle is not None:
            with contextlib.suppress(Exception):
                self._broker_handle.stop()
            self._broker_handle = None
        if self._shards is not None:
            with contextlib.suppress(Exception):
                self._shards.stop()
            self._shards = None
        with contextlib.suppress(Exception):
            self.net.run(self.artifact_proxy.close(), timeout=5)
        self.net.close()

    def __enter__(self) -> SimHarness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- models -----------------------------------------------------------------

    def _cache_key(self) -> dict[str, Any]:
        return {
            "models": {k: v.model_dump() for k, v in sorted(self.scenario.models.items())},
            "hardware": sorted({c.hw_id for c in self.scenario.fleet.classes}),
        }

    def _load_cached_models(self) -> bool:
        """Take keys, bundles and samples from ``model_cache`` if it holds this scenario's models."""
        cache = self.model_cache
        if cache is None or not (cache / "models.json").exists():
            return False
        index = json.loads((cache / "models.json").read_text())
        if index.get("key") != self._cache_key():
            return False
        keys = self.workdir / "keys"
        if not keys.exists():
            shutil.copytree(cache / "keys", keys)
        for key, entry in index["models"].items():
            self._bundles[key] = cache / "bundles" / key
            self.model_shas[key] = entry["sha256"]
            self.model_refs[key] = entry["ref"]
        self.sample_inputs = np.load(cache / "samples.npy")
        return True

    def _save_models(self) -> None:
        cache = self.model_cache
        if cache is None:
            return
        if cache.exists():
            shutil.rmtree(cache)
        cache.mkdir(parents=True)
        shutil.copytree(self.workdir / "keys", cache / "keys")
        for key, bundle in self._bundles.items():
            shutil.copytree(bundle, cache / "bundles" / key)
        assert self.sample_inputs is not None
        np.save(cache / "samples.npy", self.sample_inputs)
        models = {k: {"sha256": self.model_shas[k], "ref": self.model_refs[k]} for k in self._bundles}
        (cache / "models.json").write_text(json.dumps({"key": self._cache_key(), "models": models}))

    def _build_models(self) -> None:
        """Train the digits classifier once, then compile and sign every model the scenario names."""
        if self._load_cached_models():
            return
        from compiler.examples import make_nan_model, train_digits
        from compiler.pipeline import compile_model
        from signing.keyring import KeyDir, init_keys

        keys = self.workdir / "keys"
        if not (keys / "trust.json").exists():
            init_keys(keys)
        release_key = KeyDir(keys).key("release")
        example = train_digits(self.workdir / "digits")
        self.sample_inputs = np.load(example.eval_path)["x"].astype(np.float32)
        nan_src = self.workdir / "digits" / "nan.onnx"
        all_hw = sorted({c.hw_id for c in self.scenario.fleet.classes})
        for n, (key, spec) in enumerate(sorted(self.scenario.models.items())):
            src = example.model_path
            if spec.kind == "nan":
                if not nan_src.exists():
                    make_nan_model(example.model_path, nan_src)
                src = nan_src
            src = _tagged_copy(src, self.workdir / "digits" / f"{key}.onnx", f"{spec.name}:{spec.version}")
            release = int(spec.version) if spec.version.isdigit() else n + 1
            out = compile_model(
                src,
                target="arm64-cpu",
                calib_path=example.calib_path,
                eval_path=example.eval_path,
                out_dir=self.workdir / "bundles" / key,
                release_key=release_key,
                name=spec.name,
                version=spec.version,
                release=release,
                hardware_ids=spec.hardware or all_hw,
                gate=None,  # the scenario is about the fleet's gates, not the compiler's
                overwrite=True,
                latency_repeats=1,
            )
            self._bundles[key] = out.bundle_dir
            self.model_shas[key] = out.manifest.model_file.sha256
            self.model_refs[key] = f"{spec.name}:{spec.version}"
        self._save_models()

    def _push_models(self) -> None:
        from edgefleet.client import ApiClient
        from signing.keyring import KeyDir

        release_key = KeyDir(self.workdir / "keys").key("release")
        with ApiClient(self.server_url, token=self.admin_token) as api:
            for bundle in self._bundles.values():
                # Through TUF: the release key signs the target metadata here, never on the server.
                api.push_bundle(bundle, release_keys=[release_key])

    # -- broker -------------------------------------------------------------------

    def _start_broker(self, port: int | None, server_port: int | None = None) -> Any:
        from edgefleet.broker import mosquitto_binary, start_mosquitto, start_secure_broker

        if mosquitto_binary() is None:
            raise RuntimeError(
                "scenarios need Mosquitto (apt-get install mosquitto): broker restarts, $share"
            )
        if self.broker_auth == "insecure-dev":
            return start_mosquitto(port=port, workdir=self.workdir / "broker", persistence=True)
        return start_secure_broker(
            self.workdir / "broker", auth=self.broker_auth, keys_dir=self.workdir / "keys",
            port=port, server_port=server_port,
        )  # fmt: skip

    def _start_shards(self) -> None:
        from edgefleet.broker import mosquitto_binary, start_secure_shards

        if mosquitto_binary() is None:
            raise RuntimeError("scenarios need Mosquitto (apt-get install mosquitto)")
        if self.broker_auth == "insecure-dev":
            raise ValueError("broker shards run the production configuration only (not insecure-dev)")
        self._shards = start_secure_shards(
            len(self.shard_names),
            self.workdir / "broker",
            auth=self.broker_auth,
            keys_dir=self.workdir / "keys",
        )
        self.broker = self._shards.infos[self.shard_names[0]]

    def shard_of(self, device_id: str) -> str:
        from fleet_server.shards import assign

        return assign(device_id, self.shard_names) if len(self.shard_names) > 1 else self.shard_names[0]

    def broker_of(self, device_id: str) -> BrokerInfo:
        if self._shards is None:
            return self.broker
        info: BrokerInfo = self._shards.infos[self.shard_of(device_id)]
        return info

    def device_credentials(self, device_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Each device's agent ``mqtt_*`` keys for its broker, issued once for the run (none on an
        open broker)."""
        from edgefleet.broker import fleet_mqtt_keys

        if self._shards is None:
            return fleet_mqtt_keys(self.broker, device_ids)
        out: dict[str, dict[str, Any]] = {}
        for name, info in self._shards.infos.items():
            out |= fleet_mqtt_keys(info, [d for d in device_ids if self.shard_of(d) == name])
        return out

    def stop_brokers(self, shards: list[str], kill: bool = False) -> None:
        """Take these shards away (SIGTERM: Mosquitto saves its database; ``kill``: SIGKILL, it does not)."""
        if self._shards is None:
            raise ValueError("stop_broker needs [fleet] broker_shards > 1 (use restart_broker)")
        for name in shards:
            if kill:
                self._shards.kill(name)
            else:
                self._shards.brokers[name].stop()

    def start_brokers(self, shards: list[str]) -> None:
        """Start these shards again on their ports, directories and configuration."""
        if self._shards is None:
            raise ValueError("start_broker needs [fleet] broker_shards > 1")
        for name in shards:
            self._shards.restart(name)
        self.broker = self._shards.infos[self.shard_names[0]]

    def restart_broker(
        self, down_seconds: float, shards: list[str] | None = None, kill: bool = False
    ) -> float:
        """Stop Mosquitto (these shards, or every broker), wait ``down_seconds``, start it on the same
        ports; return how long it was away."""
        t0 = time.monotonic()
        if self._shards is not None:
            names = shards or self.shard_names
            self.stop_brokers(names, kill)
            time.sleep(down_seconds)
            self.start_brokers(names)
            return time.monotonic() - t0
        if kill:
            self._broker_handle.process.kill()
        port, server_port = self.broker.port, getattr(self.broker, "server_port", None)
        self._broker_handle.stop()
        time.sleep(down_seconds)
        self._broker_handle = self._start_broker(port, server_port)
        self.broker = self._broker_handle.info
        return time.monotonic() - t0

    # -- server -------------------------------------------------------------------

    def _server_settings(self) -> Any:
        from fleet_server.settings import ServerSettings

        if self._settings is None:
            from edgefleet.broker import server_mqtt_settings

            self._settings = ServerSettings(
                database_url=self.database_url,
                data_dir=self.workdir / "server",
                keys_dir=self.workdir / "keys",
                **{
                    **server_mqtt_settings(self.broker),
                    **({"mqtt_shards": self._shards.shards_file} if self._shards is not None else {}),
                    # One replica: plain subscriptions. Mosquitto 2.0 does not restore a persistent
                    # session's $share subscriptions after a broker restart (docs/decisions/0003).
                    "shared_subscriptions": False,
                },
                public_url=self.artifact_proxy.url,
                tick_interval=self.scenario.tick_interval,
                # A stable id: the broker keeps the server's session (and queues its QoS 1
                # streams) while the server or the broker restarts.
                mqtt_client_id=f"ef-sim-server-{uuid.uuid4().hex[:8]}",
                admin_token=self.admin_token,
                auth_required=True,
            )
        return self._settings

    def _start_server(self) -> None:
        settings = self._server_settings()
        if self.server_mode == "thread":
            from fleet_server.runner import ServerThread  # in this process: the server's imports too

            assert self._port_holder is not None
            # a duplicate: uvicorn closes its socket on stop, the holder keeps the port
            sock = self._port_holder.socket.dup()
            self._server = ServerThread(settings, sock=sock).start()
            # devices speak next: their first events need a subscriber (clean sessions)
            if not self._server.wait_subscribed(15):
                log.warning(
                    "the server's MQTT bridge has not subscribed in 15 s: devices' first events may be lost"
                )
        else:
            assert self._port_holder is not None
            self._server = ServerProcess(settings, self._port_holder, self.workdir / "server.log").start()
        self.server_url = self._server.url

    def restart_server(self, down_seconds: float) -> float:
        """Stop the server, wait ``down_seconds``, start it again; return how long it was away."""
        if self.server_mode == "thread":
            t0 = time.monotonic()
            self._server.stop()
            self._server = None
            time.sleep(down_seconds)
            self._start_server()
            return time.monotonic() - t0
        assert self._port_holder is not None
        nxt = ServerProcess(self._server_settings(), self._port_holder, self.workdir / "server.log")
        nxt.spawn()  # imports while the old server still serves
        try:
            nxt.wait_imported()
            t0 = time.monotonic()
            self._server.stop()
            self._server = None
            t_stopped = time.monotonic()
            time.sleep(down_seconds)
            t_go = time.monotonic()
            self._server = nxt.start()
        except BaseException:
            nxt.stop()
            raise
        t_back = time.monotonic()
        log.info(
            "server restart: stopping took %.1f s, down %.1f s, starting took %.1f s",
            t_stopped - t0,
            t_go - t_stopped,
            t_back - t_go,
        )
        return t_back - t0


# The server child is ``edgefleet server`` on the socket the parent bound and handed over
# (descriptor {fd}): the port is held from the moment it is chosen, through the child's seconds of
# imports and across restarts, so no other process can take it. Once the app is built (schema
# check, keys, TUF metadata; MQTT and the ticker start later, with the lifespan) it says so on
# stdout and waits for a line on stdin before it serves.
_SERVER_CODE = """
import sys
from fleet_server.runner import main

def go():
    print("imported", flush=True)
    return bool(sys.stdin.readline())  # EOF: stopped before it was told to serve

main(fd={fd}, before_serve=go)
"""


class ServerPort:
    """A loopback TCP port held by this process for the server children that serve on it.

    Bound (no SO_REUSEADDR: no other socket can bind the port while this one holds it) and not
    listening until the first child serves: connections are refused until then. From then on the
    socket stays listening across restarts, so while one server stops and the next starts,
    connections wait in its backlog and the next server answers them. Giving the listening state
    back between two servers is not an option: Linux refuses the second ``listen()`` while
    connections accepted on the port are still open or in TIME_WAIT."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.set_inheritable(True)
        self.port = int(self.socket.getsockname()[1])

    def fileno(self) -> int:
        return self.socket.fileno()

    def close(self) -> None:
        self.socket.close()


class ServerProcess:
    """``fleet_server.runner.main`` in a child process, configured through ``EDGEFLEET_*`` variables.

    :meth:`spawn` starts the interpreter and its imports; :meth:`start` (which spawns first if
    needed) lets it bind the port and waits for ``/healthz``. A restart spawns the next
    process while the old one still serves (see ``SimHarness.restart_server``). The child serves
    on ``port``'s socket, which the caller keeps (and closes) across restarts."""

    def __init__(self, settings: Any, port: ServerPort, log_path: Path) -> None:
        self.settings = settings
        self.server_port = port
        self.port = port.port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._imported = False

    def spawn(self) -> ServerProcess:
        env = dict(os.environ)
        # only what was set: a default passed on would count as set in the child and override
        # what mqtt_credentials (fleet-server.json) says
        for key, value in self.settings.model_dump(exclude_unset=True).items():
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if value is not None:
                text = json.dumps(value) if isinstance(value, dict | list) else str(value)
                env[f"EDGEFLEET_{key.upper()}"] = text
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER_CODE.format(fd=self.server_port.fileno())],
            env=env,
            pass_fds=(self.server_port.fileno(),),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        log.close()
        return self

    def wait_imported(self, timeout: float = 60.0) -> None:
        """Block until the child has imported the server (it prints ``imported``)."""
        import selectors

        proc = self._proc
        assert proc is not None and proc.stdout is not None
        if self._imported:
            return
        # a selector, not select(): a long test session may hold descriptors past FD_SETSIZE
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout)
        line = proc.stdout.readline() if ready else b""
        if line.strip() != b"imported":
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the fleet server did not start (import failed?):\n{tail}")
        self._imported = True
        # from now on its output goes to the log like stderr does
        threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True).start()

    def _pump(self, stream: Any) -> None:
        with open(self.log_path, "ab") as log:
            for line in stream:
                log.write(line)
                log.flush()

    def start(self, timeout: float = 30.0) -> ServerProcess:
        import httpx

        from device_agent.http_clients import default_verify_context

        if self._proc is None:
            self.spawn()
        assert self._proc is not None and self._proc.stdin is not None
        self.wait_imported()
        self._proc.stdin.write(b"go\n")
        self._proc.stdin.flush()
        deadline = time.monotonic() + timeout
        # One client for the whole wait: a new one per poll builds a new TLS context (~20 ms of CPU).
        with httpx.Client(timeout=1.0, verify=default_verify_context()) as probe:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    tail = self.log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"the fleet server exited during startup:\n{tail}")
                with contextlib.suppress(httpx.HTTPError):
                    if probe.get(f"{self.url}/healthz").status_code == 200:
                        return self
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"the fleet server did not answer /healthz within {timeout}s")

    def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def device_root(work: Path) -> Iterator[Path]:
    """Where the simulated devices keep their slots: in RAM (/dev/shm) when there is one.

    The agent writes and fsyncs its slots on its event loop, which is right on a device; with
    hundreds of agents on one loop, hundreds of fsyncs in a row stall every device for seconds
    (measured: an 11 s stall at 1,000 devices on disk). RAM makes fsync cheap and keeps the
    crash semantics the simulator needs (files survive an agent "crash", which is a process-level
    event here). ``EDGEFLEET_SIM_ON_DISK=1`` keeps them in the work directory.
    """
    shm = Path("/dev/shm")
    if os.environ.get("EDGEFLEET_SIM_ON_DISK") or not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield work / "devices"
        return
    root = Path(tempfile.mkdtemp(prefix="ef-sim-devices-", dir=shm))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _tagged_copy(src: Path, dst: Path, tag: str) -> Path:
    """Copy an ONNX model with ``tag`` in its metadata: same behaviour, distinct bytes and sha256,
    so two versions built from one trained model are two different artifacts to the fleet."""
    import onnx

    model = onnx.load(str(src))
    entry = model.metadata_props.add()
    entry.key, entry.value = "edgefleet.sim.model", tag
    onnx.save(model, str(dst))
    return dst


def run_scenario(
    path: Path,
    *,
    small: bool = False,
    workdir: Path | None = None,
    report_dir: Path | None = None,
    database_url: str | None = None,
    keep_workdir: bool = True,
    server_mode: str = "process",
    processes: int | None = None,
    model_cache: Path | None = None,
    broker_auth: str = "mtls",
) -> RunOutcome:
    """Load, run and report one scenario file. Raises ``ScenarioError`` on a bad file (nothing started).

    ``processes``: split the fleet over that many worker processes (default: the file's
    ``fleet.processes``, else 1). ``broker_auth``: how devices authenticate to the production
    broker (``mtls``, ``password``), or ``insecure-dev`` for the open development broker."""
    from edgefleet.broker import security_label

    scenario = load_scenario(path, small=small)
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"ef-sim-{scenario.name}-"))
    from simulator.report import write_report

    with (
        SimHarness(
            scenario,
            work,
            database_url=database_url,
            server_mode=server_mode,
            model_cache=model_cache,
            broker_auth=broker_auth,
        ) as harness,
        device_root(work) as devices,
    ):
        run = ScenarioRun(scenario, harness, work, device_root=devices, processes=processes)
        result = run.execute()
        result.figures["broker"] = security_label(harness.broker)
        if harness.mirror_url:  # what the devices asked the nginx mirror (one line per request)
            result.figures["mirror_requests"] = harness.mirror_requests()
    report = write_report(result, run.timeline, Path(report_dir) if report_dir else work / "report")
    if not keep_workdir and result.ok:
        for sub in ("devices", "server", "broker", "bundles", "digits"):
            shutil.rmtree(work / sub, ignore_errors=True)
    return RunOutcome(result, report, work)


__all__ = ["RunOutcome", "SimHarness", "run_scenario"]
