"""A :class:`device_agent.ports.Fetcher` over dictionaries: the shell's tests run without a web server.

It keeps the fetcher contract the agent relies on: a model is proven against its
signed length and hash before the call returns (a mismatch deletes the partial
file), a URL marked ``away`` raises ``Unavailable`` that many times first, an
unknown URL is a final ``DownloadError``. TUF mode needs a real repository
(``tests/agent/harness.TufServer``): here the repository is simply away.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from device_agent.downloader import DownloadError, ServerBusy
from device_agent.trust_state import TrustStore
from device_agent.wire import ModelRef
from signing.errors import DeliveryError, DeliveryUnavailable, TrustError
from signing.manifest import ENVELOPE_NAME, FileEntry, verify_file

from .harness import Bundle


class MemoryFetcher:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.away: dict[str, int] = {}  # url -> how many more calls find the server busy
        self.calls: list[str] = []

    def add(self, bundle: Bundle, model: bytes | None = None) -> tuple[str, str]:
        """Serve ``bundle`` (its model replaced by ``model``, if given); return (model_url, envelope_url)."""
        model_url, envelope_url = f"mem://m/{bundle.sha256}", f"mem://e/{bundle.sha256}"
        self.files[model_url] = bundle.model_path.read_bytes() if model is None else model
        self.files[envelope_url] = (bundle.dir / ENVELOPE_NAME).read_bytes()
        for other in bundle.dir.iterdir():  # the golden set, served beside the model file
            if other.name not in (ENVELOPE_NAME, bundle.file):
                self.files[f"{model_url}/files/{other.name}"] = other.read_bytes()
        return model_url, envelope_url

    def _get(self, url: str) -> bytes:
        self.calls.append(url)
        left = self.away.get(url, 0)
        if left > 0:
            self.away[url] = left - 1
            raise ServerBusy(f"GET {url}: HTTP 503")
        body = self.files.get(url)
        if body is None:
            raise DownloadError(f"GET {url}: HTTP 404")
        return body

    async def envelope(self, url: str) -> bytes:
        return self._get(url)

    async def model(self, url: str, part: Path, *, length: int, sha256: str) -> None:
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(self._get(url))
        try:
            verify_file(part, FileEntry(part.name, sha256, length))
        except TrustError:
            part.unlink(missing_ok=True)
            raise

    def release(
        self, store: TrustStore, base_url: str, ref: ModelRef, hardware_id: str, now: datetime
    ) -> None:
        raise DeliveryUnavailable("no TUF repository in memory")

    def root(self, store: TrustStore, base_url: str, now: datetime) -> DeliveryError | None:
        return DeliveryUnavailable("no TUF repository in memory")
