"""The deletion transparency log on a real Redis server, and end to end over HTTP: a user
deletes an output and checks the receipt with the standalone verifier alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import redis
import skimage.data

from pipeline.core.config import TransparencyConfig
from pipeline.core.records import DeletionReceipt
from pipeline.security import crypto
from pipeline.security.pseudonyms import account_ref
from pipeline.state import keys
from pipeline.state.receipts import GENESIS_HASH, ChainEntry, ReceiptLedger, _entry_hash, uri_digest
from pipeline.state.redis_server import RedisServer
from pipeline.state.tlog import TransparencyLog, audit, migrate_chain
from pipeline.transparency import verifier
from pipeline.transparency.heads import make_leaf, public_key_b64, signing_key
from serve.cli import main as cli
from tests.integration.conftest import API_TOKEN_ENV
from tests.integration.helpers import encode_image, submit, wait_finished

CFG = TransparencyConfig()
KEY = signing_key(CFG, [])
VERIFIER = Path(verifier.__file__)


@pytest.fixture()
def client_redis(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield redis.Redis.from_url(server.url)
    server.stop()


def _leaf(i: int) -> bytes:
    return make_leaf(receipt_id=f"r{i}", account_ref="ref", uri_sha256="00" * 32,
                     object_class="input", requested_s=i, verified_s=i + 1,
                     result="verified_gone")[0]


def test_concurrent_appends_lose_nothing_and_every_proof_verifies(client_redis):
    log = TransparencyLog(client_redis)
    with ThreadPoolExecutor(4) as pool:
        firsts = list(pool.map(lambda t: [log.append([_leaf(t * 100 + i)]) for i in range(40)],
                               range(4)))
    indices = sorted(i for part in firsts for i in part)
    assert indices == list(range(160)) and log.size() == 160  # none lost, none twice
    head = log.sign_head(KEY, CFG, force=True)
    assert head is not None and head.tree_size == 160
    assert audit(log, KEY.public_key()) == []
    data = log.leaves(list(range(160)))
    for index in (0, 1, 77, 128, 159):
        verifier.verify_inclusion(index, 160, verifier.leaf_hash(data[index]),
                                  log.inclusion_proof(index, 160), head.root_hash)
    for first in (1, 7, 64, 100, 160):
        verifier.verify_consistency(first, 160, log.root(first), head.root_hash,
                                    log.consistency_proof(first, 160))
    # A head per size at most; heads only grow.
    assert log.sign_head(KEY, CFG, force=True) is None
    log.append([_leaf(999)])
    assert log.sign_head(KEY, CFG) is None  # one entry waits: under the interval and count
    every_entry = CFG.model_copy(update={"head_max_entries": 1})
    assert log.sign_head(KEY, every_entry).tree_size == 161


def test_the_receipt_chain_is_carried_into_the_log_and_its_receipts_verify(client_redis):
    """Receipts written as the hash chain before the log existed: after the migration each
    request's receipt lists its objects with proofs, and the chain is gone."""
    ledger = ReceiptLedger(client_redis)
    prev, seq, receipt_ids = GENESIS_HASH, 0, []
    for r in range(3):
        receipt_id = ledger.open_request(kind="output", account_id=f"acct-{r}",
                                         subject=f"s3://b/outputs/{r}.png")
        receipt_ids.append(receipt_id)
        for o in range(2):
            entry = ChainEntry(seq, receipt_id, uri_digest(f"s3://b/outputs/{r}-{o}.png"),
                               "output", account_ref(f"acct-{r}"), 10.0 + seq, 11.0 + seq,
                               "verified_gone", prev)
            entry = replace(entry, hash=_entry_hash(entry))
            client_redis.rpush(keys.RECEIPT_CHAIN, json.dumps(asdict(entry), sort_keys=True))
            client_redis.hset(keys.RECEIPT_HEAD, mapping={"seq": seq, "hash": entry.hash})
            client_redis.rpush(keys.deletion_entries(receipt_id), seq)
            prev, seq = entry.hash, seq + 1
        ledger.close_request(receipt_id, complete=True)
    ledger.append(receipt_ids[0], DeletionReceipt("s3://b/outputs/late.png", "output", "",
                                                  20.0, True), account_id="acct-0",
                  requested_s=19.0)  # a new-style entry beside the chained ones

    with ThreadPoolExecutor(2) as pool:  # two retention replicas starting together
        carried = list(pool.map(lambda _: migrate_chain(client_redis), range(2)))
    assert sum(carried) == 6
    assert not client_redis.exists(keys.RECEIPT_CHAIN) and migrate_chain(client_redis) == 0
    log = TransparencyLog(client_redis)
    assert log.size() == 7 and audit(log, KEY.public_key()) == []
    log.sign_head(KEY, CFG, force=True)
    public = verifier.parse_public_key(public_key_b64(KEY.public_key()))
    for n, receipt_id in enumerate(receipt_ids):
        receipt = ledger.get_request(receipt_id)
        assert receipt["proof_status"] == "proven"
        assert len(receipt["objects"]) == (3 if n == 0 else 2)
        report = verifier.verify_receipt(receipt, public)
        assert report.ok, report.problems
        assert {o["opening"]["account_ref"] for o in receipt["objects"]} == {
            account_ref(f"acct-{n}")}
        assert sorted(o["requested_ms"] for o in receipt["objects"])[0] >= 10_000


@pytest.mark.integration
@pytest.mark.privacy
def test_a_user_deletes_an_output_and_verifies_the_receipt_with_the_standalone_verifier(
        client, service, tmp_path):
    """Over HTTP: make an output, delete it, save the receipt and the log's key as a phone
    would, and run verifier.py as a lone file in an isolated interpreter (no project on
    the path). Then a monitor follows the log across a second deletion."""
    account = "acct-verifies"
    photo = encode_image(skimage.data.astronaut(), "PNG")
    job = submit(client, [photo], key=crypto.new_device_key(), kind="art_style",
                 style="watercolor", account_id=account)
    assert job.status_code == 202, job.text
    view = wait_finished(client, job.json()["job_id"])
    [output_id] = view["output_ids"]

    state = tmp_path / "witness.json"
    monitor = ["transparency", "monitor", "--url", service.base_url, "--state", str(state),
               "--token-env", API_TOKEN_ENV]
    gone = client.delete(f"/v1/accounts/{account}/outputs/{output_id}").json()
    receipt = _proven(client, gone["receipt_url"])
    assert client.get(f"/v1/accounts/{account}/outputs/{output_id}").status_code == 404
    key = client.get("/v1/transparency/key").json()
    assert key["algorithm"] == "Ed25519" and key["public_key"] == public_key_b64(
        signing_key(service.settings.retention.transparency, []).public_key())
    assert cli(monitor) == 0  # pins the key, records the head

    lone = tmp_path / "phone"
    lone.mkdir()
    (lone / "verifier.py").write_bytes(VERIFIER.read_bytes())
    (lone / "receipt.json").write_text(json.dumps(receipt))
    result = _run_lone(lone, "receipt.json", key["public_key"])
    assert result.returncode == 0 and "verified: 1 object(s) deleted" in result.stdout, result

    forged = json.loads(json.dumps(receipt))
    forged["objects"][0]["inclusion_proof"][0] = "00" * 32
    (lone / "forged.json").write_text(json.dumps(forged))
    result = _run_lone(lone, "forged.json", key["public_key"])
    assert result.returncode == 1 and "does not lead to the root" in result.stdout

    # A second deletion grows the log; the first head seen stays consistent with it.
    second = wait_finished(client, submit(client, [photo], key=crypto.new_device_key(),
                                          kind="art_style", style="watercolor",
                                          account_id=account).json()["job_id"])
    again = client.delete(f"/v1/accounts/{account}/outputs/{second['output_ids'][0]}").json()
    later = _proven(client, again["receipt_url"])
    first_head = receipt["head"]
    consistency = client.get("/v1/transparency/consistency", params={
        "first": first_head["tree_size"], "second": later["head"]["tree_size"]}).json()
    (lone / "seen.json").write_text(json.dumps([{"checkpoint": first_head["checkpoint"],
                                                 "consistency": consistency}]))
    (lone / "later.json").write_text(json.dumps(later))
    result = _run_lone(lone, "later.json", key["public_key"], "seen.json")
    assert result.returncode == 0, result
    assert cli(monitor) == 0
    assert len(json.loads(state.read_text())["heads"]) >= 2
    bad = client.get("/v1/transparency/consistency", params={"first": 5, "second": 2})
    assert bad.status_code == 422 and "first" in bad.json()["detail"]


def _proven(client, receipt_url: str, timeout_s: float = 30.0) -> dict:
    """The receipt once a signed head covers every object (transparency.head_interval_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        receipt = client.get(receipt_url).json()
        if receipt.get("proof_status") == "proven":
            return receipt
        assert time.monotonic() < deadline, receipt
        time.sleep(0.1)


def _run_lone(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-I", "verifier.py", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=60)
