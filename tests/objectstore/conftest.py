"""Object stores through their real local emulators: S3 (moto's server) and GCS (gcp-storage-emulator).

Each server listens on a free loopback port for one test module, holds a bucket with the demo catalog's audio
and a manifest whose URIs point into the bucket, and is stopped (its port closed) when the module ends. The
endpoints reach our code the way they reach it in production: through the environment (`AWS_ENDPOINT_URL`,
`STORAGE_EMULATOR_HOST`), which the spawned decode workers inherit.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import fsspec
import gcsfs
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from gcp_storage_emulator.server import create_server

BUCKET = "catalog-bucket"


@dataclass(frozen=True)
class BucketCatalog:
    """The demo catalog uploaded to a bucket.

    Attributes:
        scheme: "s3" or "gs".
        endpoint: the emulator's URL.
        manifest: URI of the manifest (`<scheme>://catalog-bucket/catalog/manifest.parquet`).
        audio: URI of the audio folder next to it.
        fs: a filesystem on the emulator, for the tests' own reads and writes.
    """

    scheme: str
    endpoint: str
    manifest: str
    audio: str
    fs: fsspec.AbstractFileSystem


def _upload_catalog(fs: fsspec.AbstractFileSystem, scheme: str, endpoint: str, small_catalog) -> BucketCatalog:
    audio = f"{BUCKET}/catalog/audio"
    for path in sorted((small_catalog.root / "audio").iterdir()):
        fs.put_file(str(path), f"{audio}/{path.name}")
    manifest = pq.read_table(small_catalog.manifest_path)
    # Absolute bucket URIs, as a catalog team would write them; the missing file stays missing in the bucket.
    uris = [f"{scheme}://{audio}/{uri.rsplit('/', 1)[1]}" for uri in manifest["uri"].to_pylist()]
    manifest = manifest.set_column(manifest.schema.get_field_index("uri"), "uri", pa.array(uris, pa.string()))
    with fs.open(f"{BUCKET}/catalog/manifest.parquet", "wb") as fh:
        pq.write_table(manifest, fh)
    return BucketCatalog(scheme, endpoint, f"{scheme}://{BUCKET}/catalog/manifest.parquet", f"{scheme}://{audio}", fs)


def _port_is_closed(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def _moto_server(log: Path) -> Iterator[str]:
    """moto's S3 server in its own process on a free loopback port; yields its URL.

    Not moto's in-process ThreadedMotoServer: some deltalake calls (`DeltaTable.history`) wait on S3 while holding
    the GIL, so a server thread in the same interpreter could not answer them until the client timed out.
    """
    port = _free_port()
    with log.open("wb") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=sink, stderr=sink
        )
    try:
        deadline = time.monotonic() + 60
        while _port_is_closed(port):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto's server did not start (exit status {server.poll()}): {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert _port_is_closed(port)


@pytest.fixture(scope="module")
def s3_catalog(small_catalog, tmp_path_factory) -> Iterator[BucketCatalog]:
    """moto's S3 server, the environment pointing at it, and the catalog in a bucket."""
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with _moto_server(log) as endpoint, pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", "test")
        env.setenv("AWS_SECRET_ACCESS_KEY", "test")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ALLOW_HTTP", "true")
        # Cached filesystems would keep a client bound to an earlier endpoint (or to none).
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield _upload_catalog(fs, "s3", endpoint, small_catalog)
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def gcs_catalog(small_catalog) -> Iterator[BucketCatalog]:
    """gcp-storage-emulator on a free loopback port, STORAGE_EMULATOR_HOST pointing at it, the catalog in a bucket."""
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("STORAGE_EMULATOR_HOST", endpoint)
            gcsfs.GCSFileSystem.clear_instance_cache()
            fs = gcsfs.GCSFileSystem()
            fs.mkdir(BUCKET)
            yield _upload_catalog(fs, "gs", endpoint, small_catalog)
            gcsfs.GCSFileSystem.clear_instance_cache()
    finally:
        server.stop()
    assert _port_is_closed(port)
