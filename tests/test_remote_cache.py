"""The train cache on object storage (`data.cache_uri`), against a real S3 server on 127.0.0.1.

moto's server speaks plain HTTP; real object stores speak HTTPS, so only this test tells
litdata's obstore client to accept http. Everything else is the production path.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import torch
from litdata import StreamingDataset
from PIL import Image

from sdvae.config import ConfigError, config_from_dict
from sdvae.data.datamodule import TrainImages
from sdvae.data.prepare import PrepareSpec, prepare_split

RES = 32


@pytest.fixture
def s3_server(monkeypatch, tmp_path):
    import litdata.streaming.downloader as downloader

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(downloader._OBSTORE_CLIENT_OPTIONS, "allow_http", True)
    client = boto3.client("s3")
    deadline = time.time() + 60
    while True:
        try:
            client.create_bucket(Bucket="sdvae")
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.3)
    yield client
    proc.terminate()
    proc.wait(timeout=30)


def _stored(source: str, cache: Path | None = None) -> dict[str, bytes]:
    return {f"{x['name']}#{x['copy']}": x["image"] for x in StreamingDataset(source, cache_dir=cache and str(cache))}


def test_train_cache_on_s3_streams_the_same_samples_as_a_local_one(s3_server, tmp_path, photos):
    raw = tmp_path / "raw" / "images"
    raw.mkdir(parents=True)
    for i, arr in enumerate(photos[:4]):
        Image.fromarray(arr).save(raw / f"p{i}.jpg", quality=90)
    spec = PrepareSpec("train", RES, 16, 10**8, max_short_side=64, samples_per_image=2, num_workers=2)
    local = prepare_split(tmp_path / "raw", tmp_path / "local", spec)
    remote = prepare_split(tmp_path / "raw", tmp_path / "pointer", spec, remote="s3://sdvae/cache/train")
    # the local side is only the manifest (what DVC tracks); the chunks are in the bucket
    assert sorted(p.name for p in (tmp_path / "pointer").iterdir()) == ["manifest.json"]
    # a new version under the prefix, so a re-run never overwrites what an older pointer names
    assert remote["remote"].startswith("s3://sdvae/cache/train/") and local["remote"] is None
    prefix = remote["remote"].removeprefix("s3://sdvae/")
    keys = [o["Key"] for o in s3_server.list_objects_v2(Bucket="sdvae")["Contents"]]
    assert f"{prefix}/index.json" in keys and any(k.startswith(f"{prefix}/chunk-") for k in keys)
    assert (remote["count"], remote["images"]) == (local["count"], local["images"])  # chunk layout may differ
    # the same stored bytes for every sample (the two layouts may order them differently)
    stored_local = _stored(str(tmp_path / "local"))
    assert _stored(remote["remote"], tmp_path / "stream-raw") == stored_local and len(stored_local) == 8
    # and the training dataset, given only the pointer, streams them from the bucket as crops
    images = TrainImages(tmp_path / "pointer", RES, (RES, 64), return_ids=True, stream_cache=str(tmp_path / "stream"))
    samples = list(images)
    assert sorted(name for _, name in samples) == sorted(stored_local)
    assert all(crop.shape == (3, RES, RES) and crop.dtype == torch.uint8 for crop, _ in samples)


def test_cache_uri_must_name_an_object_store_prefix():
    assert config_from_dict({"data": {"cache_uri": "gs://bucket/prefix"}}).data.cache_uri == "gs://bucket/prefix"
    for bad in ("/mnt/shared/cache", "s3://", "http://host/x"):
        with pytest.raises(
            ConfigError, match=r"data\.cache_uri: expected null or a bucket prefix starting with one of s3://"
        ):
            config_from_dict({"data": {"cache_uri": bad}})
