"""A real static TUF repository served over real HTTP, and a device that fetches from it (helpers).

Modelled on python-tuf's own tests (a repository driving the real ngclient
Updater), but the repository is edgefleet's ``TufRepository`` writing files and
the transport is a real HTTP server on loopback: attacks are edits an attacker
who controls the server (or the network) could make to those files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from signing.keyring import KeyDir
from signing.targets import TargetCustom, VerifiedTarget
from signing.tuf_client import fetch_target
from signing.tuf_repo import TufRepository

MODEL = "face-det/model.onnx"


@dataclass
class Delivery:
    """A key directory, the repository it signs, and one device's pinned root and cache."""

    keydir: KeyDir
    repo: TufRepository
    url: str
    tmp: Path
    pinned_root: bytes
    cache: Path

    @property
    def metadata_url(self) -> str:
        return f"{self.url}/metadata/"

    @property
    def targets_url(self) -> str:
        return f"{self.url}/targets/"

    def release(
        self,
        data: bytes,
        *,
        name: str = MODEL,
        release: int = 1,
        hardware_ids: list[str] | None = None,
        family: str = "face-det",
    ) -> None:
        """Add a target signed by the release key(s) and publish snapshot + timestamp with the fleet key."""
        src = self.tmp / "incoming.bin"
        src.write_bytes(data)
        custom = TargetCustom(family, release, hardware_ids or ["rpi4"])
        self.repo.add_target(name, src, custom, self.keydir.keys("release"))
        self.repo.publish(self.keydir.key("fleet"))

    def fetch(
        self, name: str = MODEL, *, cache: Path | None = None, root: bytes | None = None
    ) -> VerifiedTarget:
        """The device side: a new Updater anchored on the pinned root, downloading into its slot."""
        return fetch_target(
            name,
            self.tmp / "slot" / "model.bin",
            trusted_root=root or self.pinned_root,
            cache_dir=cache or self.cache,
            metadata_url=self.metadata_url,
            targets_url=self.targets_url,
        )

    def meta(self, name: str) -> Path:
        return self.repo.metadata_dir / name
