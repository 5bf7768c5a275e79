"""The TUF half of an install decision on the device: release metadata, agreement, floors.

Before a byte of a model is downloaded, the agent asks the repository (a new
python-tuf ``Updater`` per check, anchored on the root in its trust state, never
on the writable cache) what the release keys signed for the directive's model,
then checks that the fleet-signed directive agrees with it (hash, length,
hardware id) and that the release is not below its family's signed floor. The
bytes themselves are then streamed once, resumably, by ``downloader`` and
checked against the same hash (decision 0004: ``download_target`` would read
them three times).

Every refusal is a ``signing.errors.TrustError`` whose ``code`` the agent
reports as the Event reason; a repository out of reach is a
``DeliveryUnavailable`` (an ``Unavailable``, not a verdict: the agent retries).

Expiry is judged against the DEVICE's wall clock (``now``, the agent's injectable
clock), like every other date the agent checks: ``signing.tuf_client.new_updater``
takes it as the update's fixed reference time (TUF spec 5.1).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from tuf.api.metadata import Metadata, Root
from tuf.ngclient import FetcherInterface, Updater

from device_agent import wire as protocol
from device_agent.mirrors import repository_url
from device_agent.trust_state import TrustStore
from signing.agreement import check_agreement, check_floor, merge_floors
from signing.errors import DeliveryError, DeliveryUnavailable
from signing.targets import VerifiedTarget
from signing.tuf_client import new_updater, trusted_root_bytes, tuf_errors, verified_target
from signing.tuf_release import target_name


def _updater(
    store: TrustStore, base_url: str, now: datetime | None, fetcher: FetcherInterface | None
) -> Updater:
    """An Updater anchored on the stored root, caching in the store's directory. Call it, and use
    what it returns, with ``store.cache_lock`` held: opening one swaps the cache's root.json link."""
    metadata_url = f"{base_url}/metadata/"
    return new_updater(store.state.root, store.cache_dir, metadata_url, fetcher=fetcher, reference_time=now)


def verify_release(
    store: TrustStore,
    base_url: str,
    ref: protocol.ModelRef,
    hardware_id: str,
    now: datetime | None = None,
    *,
    fetcher: FetcherInterface | None = None,
) -> VerifiedTarget:
    """Resolve ``ref`` in the signed release metadata and run the agreement and floor checks.

    Advances the trust state (newer root, higher floors) as soon as python-tuf
    verified them, even when the install is then refused: a floor learnt is
    never forgotten. Blocking (HTTP + signature checks): call it in a thread.
    ``now``: the device's wall clock for the expiry checks (None: the host clock);
    ``fetcher``: how to reach the repository (None: python-tuf's own).
    """
    with store.cache_lock:
        target = verified_target(
            _updater(store, base_url, now, fetcher), store.cache_dir, target_name(ref.name, ref.version)
        )
        new_root = None
        if target.root_version > store.state.root_version:
            new_root = trusted_root_bytes(store.cache_dir, target.root_version)
        floors = merge_floors(store.state.floors, target.floors)
        store.advance(root=new_root, floors=floors, repository_url=base_url)
    check_agreement(target, directive_sha256=ref.sha256, directive_length=ref.length, hardware_id=hardware_id)
    check_floor(target, floors)
    return target


def refresh_root(
    store: TrustStore, base_url: str, now: datetime | None = None, *, fetcher: FetcherInterface | None = None
) -> DeliveryError | None:
    """Walk the repository's root chain from the stored root as far as it is valid; store the result.

    Called when a directive is signed by a key the stored root does not know:
    after a rotation the new fleet key is only trusted once the new root is.
    Returns what refused the rest of the chain (or the metadata after it), None
    when everything verified: a forged root N+1 leaves the device at N.
    """
    if not base_url:
        return DeliveryUnavailable("no repository URL known to refresh the root from")
    failure: DeliveryError | None = None
    with store.cache_lock:
        before = store.state.root_version
        try:
            updater = _updater(store, base_url, now, fetcher)
            with tuf_errors():
                updater.refresh()
        except DeliveryError as exc:
            failure = exc  # the root step may have advanced before a later link or role failed
        after = cached_root_version(store.cache_dir)
        if after > before:
            store.advance(root=trusted_root_bytes(store.cache_dir, after))
    return failure


def cached_root_version(cache_dir: Path) -> int:
    """The version of the root python-tuf last verified and persisted in ``cache_dir`` (0: none)."""
    try:
        version: int = Metadata[Root].from_bytes((cache_dir / "root.json").read_bytes()).signed.version
    except (OSError, ValueError):
        return 0
    return version


__all__ = ["refresh_root", "repository_url", "verify_release"]
