"""Users' rights over HTTP on the real service: the export lists every piece held for an
account and nothing of another; opt-out is stored; an under-13 signal deletes everything
with a receipt and blocks the account; deletions are privacy requests; the report finds
late ones; receipts and bucket keys carry pseudonyms, never account ids."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import skimage.data

from pipeline.privacy.rights import PrivacyRequests, RequestKind
from pipeline.security import crypto
from pipeline.security.pseudonyms import account_ref
from pipeline.state import keys
from serve.cli import main as cli
from tests.integration.helpers import (
    api_over,
    encode_image,
    job_url,
    log_leaves,
    submit,
    wait_finished,
)

pytestmark = [pytest.mark.integration, pytest.mark.privacy]
PHOTO = encode_image(skimage.data.astronaut(), "PNG")


def _job(client, account: str) -> dict:
    response = submit(client, [PHOTO], key=crypto.new_device_key(), kind="art_style",
                      style="watercolor", account_id=account)
    assert response.status_code == 202, response.text
    view = wait_finished(client, response.json()["job_id"])
    assert view["status"] == "succeeded", view
    return view


def _deleted(client, receipt_url: str, timeout_s: float = 60.0) -> dict:
    """The receipt once complete, through the client's wait_deletion."""
    _, _, account, _, receipt_id = receipt_url.strip("/").split("/")
    receipt = api_over(client).wait_deletion(account, receipt_id, timeout_s=timeout_s)
    return receipt.model_dump(mode="json")


def test_the_export_lists_every_piece_held_and_nothing_of_another_account(client, store_root):
    mine, theirs = "acct-export-me", "acct-export-other"
    kept, deleted = _job(client, mine), _job(client, mine)
    other = _job(client, theirs)
    gone_id = deleted["output_ids"][0]
    receipt_id = client.delete(f"/v1/accounts/{mine}/outputs/{gone_id}").json()["receipt_id"]
    assert client.post(f"/v1/accounts/{mine}/privacy/opt-out",
                       json={"opt_out": True}).status_code == 200

    deadline = time.monotonic() + 20  # the runners flush usage every second here
    while len((export := client.get(f"/v1/accounts/{mine}/privacy/export").json())["usage"]) < 2:
        assert time.monotonic() < deadline, export["usage"]
        time.sleep(0.5)

    assert export["account_id"] == mine
    assert [o["output_id"] for o in export["outputs"]] == kept["output_ids"]
    [output] = export["outputs"]
    stored = list(store_root.rglob(f"{output['output_id']}.*"))
    assert len(stored) == 1 and output["size_bytes"] == stored[0].stat().st_size > 0
    assert output["provider"] == "local" and output["media_type"] == "image/png"
    assert {j["job_id"] for j in export["jobs"]} == {kept["job_id"], deleted["job_id"]}
    assert all(j["num_inputs_purged_verified"] == j["num_inputs"] == 1 for j in export["jobs"])
    [receipt] = export["deletion_receipts"]
    assert receipt["receipt_id"] == receipt_id and receipt["objects_verified_gone"] == 1
    kinds = sorted(r["kind"] for r in export["privacy_requests"])
    assert kinds[-1] == "opt_out" and set(kinds) == {"know", "opt_out"}
    assert [u["kind"] for u in export["usage"]] == ["art_style", "art_style"]
    assert all(u["outcome"] == "succeeded" for u in export["usage"])
    assert export["flags"] == {"opted_out_of_sale_and_sharing": True}
    text = json.dumps(export)
    assert theirs not in text and other["job_id"] not in text
    assert not set(other["output_ids"]) & set(text.split('"'))


def test_under_13_deletes_everything_with_a_receipt_and_blocks_the_account(
        client, store_root, redis_client):
    child = "acct-under-13"
    view = _job(client, child)
    [output_id] = view["output_ids"]
    assert list(store_root.rglob(f"{output_id}.*"))

    response = client.post(f"/v1/accounts/{child}/age-signal", json={"under_13": True})

    assert response.status_code == 202, response.text
    receipt = _deleted(client, response.json()["receipt_url"])
    assert any(o["object_class"] == "output" for o in receipt["objects"])
    assert list(store_root.rglob(f"{output_id}.*")) == []
    assert client.get(f"/v1/accounts/{child}/outputs").json()["outputs"] == []
    assert client.get(job_url(view["job_id"])).status_code == 404
    again = submit(client, [PHOTO], key=crypto.new_device_key(), kind="art_style",
                   style="watercolor", account_id=child)
    assert again.status_code == 403 and "under 13" in again.json()["detail"]
    assert redis_client.exists(keys.blocked_account(account_ref(child)))
    assert not [k for k in redis_client.scan_iter(f"eph:acct:{child}:*")
                if not k.endswith(b":deleting")]  # only the tombstone, which expires
    requests = PrivacyRequests(redis_client)
    requests.settle_deletions()  # what the report does: the finished deletion completes it
    assert not [r for r in requests.open_requests() if r.account_ref == account_ref(child)]


def test_receipts_and_bucket_keys_carry_pseudonyms_not_account_ids(client, store_root,
                                                                   redis_client):
    account = "acct-pseudonym"
    view = _job(client, account)
    [output_id] = view["output_ids"]
    [path] = store_root.rglob(f"{output_id}.*")
    assert account_ref(account) in path.as_posix() and account not in path.as_posix()
    gone = client.delete(f"/v1/accounts/{account}/outputs/{output_id}").json()
    receipt = client.get(gone["receipt_url"]).json()
    # The receipt (the account's own) opens its leaf with the pseudonym; the public leaves
    # hold neither the id nor the pseudonym.
    assert [o["opening"]["account_ref"] for o in receipt["objects"]] == [account_ref(account)]
    leaves = log_leaves(redis_client)
    assert leaves and all(set(e) == {"v", "object_class", "requested_ms", "verified_ms",
                                     "result", "subject"} for e in leaves)
    text = json.dumps(leaves)
    assert account not in text and account_ref(account) not in text
    assert cli(["retention", "verify-ledger", "--redis-url", _url(redis_client)]) == 0


def _url(client) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


def test_the_report_exits_non_zero_when_a_request_is_late(redis_client, capsys):
    requests = PrivacyRequests(redis_client)
    late = requests.open(RequestKind.DELETE, "acct-late", now_s=time.time() - 50 * 86400,
                         acknowledged=False)
    try:
        assert cli(["privacy", "report", "--redis-url", _url(redis_client)]) == 1
        out = capsys.readouterr().out
        assert f"LATE {late.request_id}" in out and "business days" in out
    finally:
        requests.complete(late.request_id)
    assert cli(["privacy", "report", "--redis-url", _url(redis_client)]) == 0


def test_privacy_calls_refuse_a_bad_body(client):
    response = client.post("/v1/accounts/acct-x/age-signal", json={"under_13": "yes"})
    assert response.status_code == 422 and "under_13" in response.json()["detail"]
    response = client.post("/v1/accounts/acct-x/privacy/opt-out", content=b"[1]",
                           headers={"content-type": "application/json"})
    assert response.status_code == 422  # JSON, but not an object
    response = client.post("/v1/accounts/acct-x/privacy/opt-out", content=b"{opt_out: 1",
                           headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"] == "InvalidUpload"
    response = client.post("/v1/accounts/acct-x/privacy/opt-out", json={"opt_out": 1})
    assert response.status_code == 422  # a flag is a JSON boolean, not a number


def test_usage_events_hold_no_personal_data_and_aggregates_honour_opt_outs(
        client, store_root, redis_client, tmp_path):
    """Jobs of six accounts (one opted out) leave Parquet usage events under usage/day=...;
    they carry pseudonyms, kind, timings and outcome, never an account id, a reason or a
    file name; the aggregate for sharing leaves the opted-out account out and suppresses
    groups smaller than k."""
    import pyarrow.parquet as pq

    accounts = [f"acct-usage-{i}" for i in range(6)]
    assert client.post(f"/v1/accounts/{accounts[0]}/privacy/opt-out",
                       json={"opt_out": True}).status_code == 200
    for account in accounts:
        _job(client, account)
    refs = {account_ref(a) for a in accounts}
    deadline = time.monotonic() + 30
    rows: list[dict] = []
    while time.monotonic() < deadline:
        files = sorted(store_root.glob("usage/day=*/*.parquet"))
        rows = [r for f in files for r in pq.read_table(f).to_pylist()
                if r["account_ref"] in refs]
        if len(rows) >= len(accounts):
            break
        time.sleep(0.5)
    assert {r["account_ref"] for r in rows} == refs
    assert all(r["kind"] == "art_style" and r["outcome"] == "succeeded" and r["total_s"] > 0
               for r in rows)
    raw = b"".join(f.read_bytes() for f in store_root.glob("usage/day=*/*.parquet"))
    assert not any(a.encode() in raw for a in accounts)
    assert b"astronaut" not in raw and b".png" not in raw

    out = tmp_path / "aggregate.parquet"
    assert cli(["usage", "aggregate", "--out", str(out), "--redis-url", _url(redis_client),
                "--store-url", f"file://{store_root}"]) == 0
    groups = pq.read_table(out).to_pylist()
    assert all(g["accounts"] >= 5 for g in groups)
    every = [r for f in store_root.glob("usage/day=*/*.parquet") for r in pq.read_table(f).to_pylist()]
    excluded = {r.decode() for r in redis_client.smembers(keys.OPTED_OUT_REFS)}
    assert account_ref(accounts[0]) in excluded
    day = rows[0]["day"]
    expected = {r["account_ref"] for r in every if r["day"] == day and r["kind"] == "art_style"
                and r["style"] == "watercolor" and r["country"] == ""
                and r["outcome"] == "succeeded"} - excluded
    [group] = [g for g in groups if (g["day"], g["kind"], g["style"], g["country"],
                                     g["outcome"]) == (day, "art_style", "watercolor", "",
                                                       "succeeded")]
    assert group["accounts"] == len(expected)  # the opted-out account is not counted
    assert "account_ref" not in pq.read_table(out).column_names


def _recent_files(root: Path, since_s: float, max_bytes: int = 20 << 20,
                  skip: tuple[Path, ...] = ()) -> list[tuple[str, bytes]]:
    found = []
    for path in root.rglob("*"):
        if any(path.is_relative_to(other) for other in skip):
            continue
        try:
            if path.is_file() and path.stat().st_mtime >= since_s and path.stat().st_size <= max_bytes:
                found.append((str(path), path.read_bytes()))
        except OSError:  # a file that went away meanwhile, a socket
            continue
    return found


def _usage_rows(store_root: Path, ref: str) -> int:
    """Rows of the account ``ref`` (its pseudonym) in the usage Parquet files stored now."""
    import pyarrow.parquet as pq

    rows = 0
    for path in store_root.glob("usage/day=*/*.parquet"):
        try:
            refs = pq.read_table(path, columns=["account_ref"]).column("account_ref")
        except (OSError, ValueError):  # rewritten or deleted meanwhile (written atomically)
            continue
        rows += sum(1 for r in refs.to_pylist() if r == ref)
    return rows


def _wait_usage_rows(store_root: Path, ref: str, expected: int, timeout_s: float = 30.0) -> None:
    """Wait until the runners flushed ``expected`` usage events of the account to the store."""
    deadline = time.monotonic() + timeout_s
    while (found := _usage_rows(store_root, ref)) != expected:
        assert found < expected, f"{found} usage rows for the account, {expected} jobs ended"
        assert time.monotonic() < deadline, (
            f"{found} of {expected} usage rows for the account after {timeout_s} s")
        time.sleep(0.25)


def test_media_keys_embeddings_gps_and_account_ids_are_nowhere_they_should_not_be(
        client, service, store_root, redis_client, redis_server, face_weights_path):
    """Purpose limitation, checked: after a mixed workload with failures (a GPS-tagged
    ai_photo, a tagged phone video, an animation, a job that fails, an upload refused at
    the door), scan Ray's logs, Redis (values and its AOF), the Parquet
    usage files, the object store, Ray's spill folder and every temporary file written
    meanwhile. Uploads, stripped media, device keys, GPS strings and the face embedding
    (computed here with the service's weights; as bytes, base64 or printed numbers) appear
    nowhere; raw account ids appear in no log, usage file, receipt or bucket key."""
    import base64
    import tempfile
    import uuid

    from pipeline.core.config import ServiceConfig
    from pipeline.media.ingest import check_upload
    from tests.integration.helpers import (
        CAMERA_MODEL,
        embedding_patterns,
        face_embedding,
        files_under,
        find_needles,
        find_patterns,
        jpeg_with_gps,
        redis_values,
        windows,
    )
    from tests.unit.factories import LOCATION_TAG, make_video

    started = time.time()
    account = f"acct-purpose-{uuid.uuid4().hex[:8]}"
    key = crypto.new_device_key()
    photo = jpeg_with_gps(skimage.data.astronaut())
    video = make_video(frames=10)
    cat = jpeg_with_gps(skimage.data.chelsea())  # no human face: the job fails
    jobs = [(photo, "photo.jpg", "ai_photo", "portrait", "succeeded"),
            (video, "clip.mp4", "art_style", "watercolor", "succeeded"),
            (PHOTO, "still.png", "animate", "living", "succeeded"),
            (cat, "cat.jpg", "ai_photo", "portrait", "failed")]
    for data, name, kind, style, outcome in jobs:
        response = submit(client, [data], key=key, kind=kind, style=style, account_id=account,
                          names=[name])
        assert response.status_code == 202, response.text
        assert wait_finished(client, response.json()["job_id"])["status"] == outcome
    truncated = photo[: len(photo) // 2]  # refused at the door, with its GPS header intact
    refused = submit(client, [truncated], key=key, account_id=account, names=["cut.jpg"])
    assert 400 <= refused.status_code < 500
    client.get(f"/v1/accounts/{account}/outputs")
    deleted = client.get(f"/v1/accounts/{account}/outputs").json()["outputs"][0]["output_id"]
    client.delete(f"/v1/accounts/{account}/outputs/{deleted}")
    _wait_usage_rows(store_root, account_ref(account), len(jobs))  # the refused one: none

    secrets = {"key": key, "key-b64": base64.b64encode(key), "camera": CAMERA_MODEL,
               "location": LOCATION_TAG.encode(), "lat": b"48.8584"}
    secrets |= {f"photo-{i}": w for i, w in enumerate(windows(photo))}
    secrets |= {f"cat-{i}": w for i, w in enumerate(windows(cat))}
    secrets |= {f"video-{i}": w for i, w in enumerate(windows(video, 32))}
    ray_logs = files_under(Path(_ray_logs()))
    spill = files_under(service.spill_dir) if service.spill_dir else []
    # Other Ray instances on the machine (a benchmark, a mutation run beside the suite)
    # keep their own session folders under the temp folder: not this service's files.
    own_session = Path(_ray_logs()).parent
    others = tuple(p for p in Path(own_session).parent.glob("session_*")
                   if p.is_dir() and not p.is_symlink() and p != own_session)
    temporary = _recent_files(Path(tempfile.gettempdir()), started, skip=others)
    stored = files_under(store_root, redis_server.data_dir)
    everywhere = ray_logs + spill + temporary + stored + redis_values(redis_client)
    assert find_needles(everywhere, secrets) == []
    clean = check_upload(photo, index=1, limits=ServiceConfig()).png_bytes
    embedding = face_embedding(clean, face_weights_path)
    patterns = embedding_patterns(embedding)
    assert find_patterns(everywhere, patterns) == []
    # The patterns can see: they find this embedding however a log line would print it.
    for printed in (str(embedding), repr(embedding.tolist()), f"{embedding[:8]}"):
        assert find_patterns([("control", printed.encode())], patterns), printed

    account_id = {"account": account.encode()}
    usage = [(w, b) for w, b in stored if "/usage/" in w]
    chain = [("receipts", json.dumps(log_leaves(redis_client)).encode())]
    assert usage and find_needles(ray_logs + usage + chain, account_id) == []
    # The scan can see: the same search finds the id where it belongs (Redis's indexes),
    # and the logs it read are this run's.
    assert find_needles(redis_values(redis_client), account_id)
    assert len(ray_logs) > 5 and any(b"ServeReplica" in blob for _, blob in ray_logs)
    assert not [p for p in store_root.rglob("*") if account in p.as_posix()]


def _ray_logs() -> str:
    import ray

    return ray._private.worker._global_node.get_logs_dir_path()
