"""The media pool over HTTP on the real service: hostile uploads are refused with a reason
and change nothing, and a decoder child killed mid-decode costs only its own request, never
the ingress or the media replica (marker security; the pool's code path alone, case by
case, is tests/security/test_hostile_media.py)."""

from __future__ import annotations

import os

import pytest

from pipeline.security import crypto
from tests.integration.helpers import replica_pid, run_in_replica, submit
from tests.security.corpus import HOSTILE, build, phone_jpeg_12mp

pytestmark = [pytest.mark.integration, pytest.mark.security]
REFUSED = [s.name for s in HOSTILE if s.expect == "refused"]


def _no_trace(client, account: str) -> None:
    jobs = client.get(f"/v1/accounts/{account}/jobs").json()
    assert jobs["jobs"] == [], jobs


@pytest.mark.parametrize("name", REFUSED)
def test_a_hostile_upload_is_refused_over_http_and_changes_nothing(name, client):
    case = build(name)
    ingress, media = replica_pid("ApiDeployment"), replica_pid("MediaDeployment")
    account = f"acct-hostile-{os.urandom(4).hex()}"
    response = submit(client, [data for _, data in case.files], key=crypto.new_device_key(),
                      kind=case.kind, style="watercolor", account_id=account,
                      names=[n for n, _ in case.files])
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["detail"]
    _no_trace(client, account)
    assert (replica_pid("ApiDeployment"), replica_pid("MediaDeployment")) == (ingress, media)


def _tight_wall_budget_once(wall_s: float):
    """Fault injection, run inside the media replica: the next decode runs under a wall
    budget of ``wall_s`` (so the parent kills its child mid-decode), then the defaults."""
    def install(_actor) -> int:
        import dataclasses

        from pipeline.media import sandbox

        real = sandbox.SandboxedDecoder.decode

        def decode(self, data, **kwargs):
            sandbox.SandboxedDecoder.decode = real
            budget = self.budget
            self.budget = dataclasses.replace(budget, wall_s=wall_s)
            try:
                return real(self, data, **kwargs)
            finally:
                self.budget = budget

        sandbox.SandboxedDecoder.decode = decode
        return os.getpid()
    return install


def sandbox_children(parent: int) -> set[int]:
    """The sandboxed decoder processes of a media replica, read from /proc."""
    from pathlib import Path

    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"pipeline.media.sandbox" in cmdline:
            found.add(int(entry.name))
    return found


def test_a_decoder_child_killed_mid_decode_fails_only_its_request(client):
    ingress = replica_pid("ApiDeployment")
    media = run_in_replica("MediaDeployment", _tight_wall_budget_once(0.05))
    children = sandbox_children(media)
    assert children, "the media replica runs no sandboxed decoder"
    account = f"acct-child-{os.urandom(4).hex()}"
    key = crypto.new_device_key()
    refused = submit(client, [phone_jpeg_12mp()], key=key, kind="art_style",
                     style="watercolor", account_id=account, names=["IMG_0001.jpg"])
    assert refused.status_code == 413 and "time budget" in refused.json()["detail"]
    _no_trace(client, account)
    assert not children & sandbox_children(media)  # the child was killed and replaced
    accepted = submit(client, [build("jpeg-with-zip-appended").files[0][1]], key=key,
                      kind="art_style", style="watercolor", account_id=account)
    assert accepted.status_code == 202, accepted.text
    assert sandbox_children(media) - children  # a fresh child decoded it
    assert (replica_pid("ApiDeployment"), replica_pid("MediaDeployment")) == (ingress, media)
