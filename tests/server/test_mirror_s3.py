"""Publishing to an S3-compatible bucket over real HTTP: moto's standalone server (``moto_server``,
PyPI ``moto[server]``), since no MinIO can be installed here. It speaks the S3 REST API with
SigV4-signed requests from boto3; what it does not model (consistency under load, multipart
edge cases, IAM policies) is not what this test checks: keys, order, headers, idempotence,
and that a device's TUF client verifies what the bucket serves."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.ports import wait_for_port
from fleet_server.mirror import IMMUTABLE_CACHE, TIMESTAMP_CACHE, TIMESTAMP_KEY, Publisher, S3Storage
from signing.keyring import KeyDir, init_keys
from signing.targets import TargetCustom
from signing.tuf_client import check_target
from signing.tuf_repo import TufRepository

boto3 = pytest.importorskip("boto3")


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto S3 server (real HTTP, in a thread) on a free loopback port, with throwaway credentials
    in the environment. It binds port 0 itself: no other process can take its port in between."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    for name, value in {
        "AWS_ACCESS_KEY_ID": "edgefleet-test",
        "AWS_SECRET_ACCESS_KEY": "edgefleet-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    server.start()
    try:
        host, port = server.get_host_and_port()
        wait_for_port(host, port, timeout=30)
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_publishing_to_a_bucket_sets_cache_headers_is_idempotent_and_serves_a_tuf_client(
    tmp_path: Path, s3_endpoint: str
) -> None:
    init_keys(tmp_path / "keys")
    keydir = KeyDir(tmp_path / "keys")
    repo = TufRepository.create(
        tmp_path / "tuf", keydir.tuf_root(), keydir.keys("release"), keydir.key("fleet")
    )
    model = tmp_path / "model.onnx"
    model.write_bytes(b"weights" * 1000)
    repo.add_target("models/tiny/1", model, TargetCustom("tiny", 1, ["hw"]), keydir.keys("release"))
    repo.publish(keydir.key("fleet"))
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="fleet")

    storage = S3Storage("s3://fleet/edge", endpoint_url=s3_endpoint)
    first = Publisher(storage, repo.path).publish()
    assert first.uploaded[-1] == TIMESTAMP_KEY and first.timestamp == "uploaded"
    target_key = f"targets/models/tiny/{repo.target_file('models/tiny/1').name}"
    assert target_key in first.uploaded
    assert set(storage.sizes()) == set(first.uploaded)  # under the prefix, nothing else
    head = client.head_object(Bucket="fleet", Key=f"edge/{target_key}")
    assert head["CacheControl"] == IMMUTABLE_CACHE and head["ContentLength"] == model.stat().st_size
    ts = client.head_object(Bucket="fleet", Key=f"edge/{TIMESTAMP_KEY}")
    assert ts["CacheControl"] == TIMESTAMP_CACHE and ts["ContentType"] == "application/json"

    again = Publisher(storage, repo.path).publish()
    assert again.uploaded == [] and again.timestamp == "unchanged"
    repo.refresh_timestamp(keydir.key("fleet"))
    assert Publisher(storage, repo.path).publish().uploaded == [TIMESTAMP_KEY]

    # the bucket as a mirror (path-style URL, anonymous reads as a bucket policy grants them, the
    # way a bucket is opened to a CDN or to devices): python-tuf verifies what it serves
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": "arn:aws:s3:::fleet/*",
            }
        ],
    }
    client.put_bucket_policy(Bucket="fleet", Policy=json.dumps(policy))
    target = check_target(
        "models/tiny/1",
        trusted_root=keydir.tuf_root(),
        cache_dir=tmp_path / "device",
        metadata_url=f"{s3_endpoint}/fleet/edge/metadata/",
    )
    assert target.length == model.stat().st_size


def test_an_s3_mirror_needs_a_bucket_url() -> None:
    with pytest.raises(ValueError, match="s3://bucket"):
        S3Storage("s3:///no-bucket")
