"""End-to-end attack fixtures: a real TUF repository over real HTTP, real artifacts, a real broker,
and the real agent in TUF mode (``tuf_root_path`` + ``tuf_url``), already serving model v1.

Each attack then publishes a signed (or forged) directive, retained, on the real
broker and edits what the repository or the artifact server answers, as an
attacker controlling the server or the network could.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent import protocol
from device_agent.agent import Agent
from signing.keyring import KeyDir
from signing.keys import KeyPair
from signing.targets import TargetCustom
from signing.tuf_release import target_name
from signing.tuf_repo import TufRepository
from tests.agent.harness import (
    HW,
    ArtifactServer,
    Bundle,
    LoopThread,
    Observer,
    X,
    make_bundle,
    sign_directive,
    wait_for,
)


@dataclass
class Fleet:
    """One device under attack and everything around it."""

    keydir: KeyDir
    repo: TufRepository
    repo_url: str
    artifacts: ArtifactServer
    observer: Observer
    loop: LoopThread
    agent: Agent
    tmp: Path
    serving: Bundle  # what the device serves before the attack
    seq: int = 1
    releases: dict[str, int] = field(default_factory=dict)

    @property
    def device_id(self) -> str:
        return self.agent.device_id

    def bundle(self, seed: int, version: str, key: KeyPair | None = None, **kw: Any) -> Bundle:
        b = make_bundle(
            self.tmp / "bundles", key or self.keydir.key("release"), seed=seed, version=version, **kw
        )
        self.artifacts.add(b)
        return b

    def release(
        self,
        b: Bundle,
        *,
        release: int | None = None,
        hardware_ids: list[str] | None = None,
        keys: list[KeyPair] | None = None,
        fleet_key: KeyPair | None = None,
    ) -> None:
        """Sign ``b`` into the targets metadata (release keys); publish snapshot + timestamp (fleet key)."""
        custom = TargetCustom(
            b.name, release if release is not None else int(b.version), hardware_ids or [HW]
        )
        self.repo.add_target(
            target_name(b.name, b.version), b.model_path, custom, keys or self.keydir.keys("release")
        )
        self.repo.publish(fleet_key or self.keydir.key("fleet"))

    def direct(
        self, b: Bundle | None, *, key: KeyPair | None = None, seq: int | None = None, **kw: Any
    ) -> int:
        """Publish a retained directive for ``b`` (next seq unless given); return its seq."""
        if seq is None:
            self.seq += 1
            seq = self.seq
        ref = self.artifacts.model_ref(b, release=int(b.version)) if b is not None else None
        device = kw.pop("device_id", self.device_id)
        self.observer.publish(
            self.device_id, sign_directive(key or self.keydir.key("fleet"), device, seq, ref, **kw)
        )
        return seq

    def refused(
        self, seq: int, reason: str, *, unverified: bool = False, timeout: float = 15.0
    ) -> protocol.Event:
        """Wait for the refusal Event with ``reason``; check the device still serves its model.

        ``unverified``: the directive's signature was refused, so its seq is unknown (reported as 0).
        """
        seq = 0 if unverified else seq

        def find() -> protocol.Event | None:
            for e in self.observer.events(self.device_id):
                if e.seq == seq and e.state in (
                    protocol.DeploymentState.FAILED,
                    protocol.DeploymentState.REJECTED,
                ):
                    return e
            return None

        event: protocol.Event = wait_for(find, timeout, f"refusal of seq {seq}")
        assert event.reason == reason, (event.reason, event.detail)
        self.still_serving()
        reported = wait_for(
            lambda: [
                r
                for r in self.observer.reported(self.device_id)
                if r.last_rejection and r.last_rejection.seq == seq
            ],
            timeout,
            "reported rejection",
        )
        assert reported[-1].last_rejection is not None and reported[-1].last_rejection.reason == reason
        return event

    def still_serving(self, b: Bundle | None = None) -> None:
        b = b or self.serving
        assert self.agent.running_sha256 == b.sha256
        assert self.agent.infer(X).model_sha256 == b.sha256

    def installs(self, b: Bundle, seq: int, timeout: float = 20.0) -> None:
        self.observer.wait_event(self.device_id, protocol.DeploymentState.SERVING, seq=seq, timeout=timeout)
        self.still_serving(b)
        self.serving = b
