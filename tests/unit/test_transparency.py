"""The deletion log's Merkle tree, proofs, signed heads and monitor, without servers: the
tree kept in a dict of perfect subtrees exactly as Redis keeps it (tests/integration/
test_transparency_log.py runs the Redis-backed log and the HTTP path)."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipeline.core.config import TransparencyConfig
from pipeline.transparency import merkle
from pipeline.transparency.heads import checkpoint, make_leaf, public_key_b64, signing_key
from pipeline.transparency.monitor import MonitorState, observe
from pipeline.transparency.verifier import (
    VerificationError,
    leaf_hash,
    node_hash,
    parse_public_key,
    subject_commitment,
    verify_checkpoint,
    verify_consistency,
    verify_inclusion,
    verify_receipt,
)

CFG = TransparencyConfig()
KEY = signing_key(CFG, [])  # the public demo key
OTHER = Ed25519PrivateKey.generate()


class MemoryTree:
    """Perfect subtrees in a dict, appended through merkle.extend as the Redis log does."""

    def __init__(self, leaves: list[bytes] = ()) -> None:
        self.nodes: dict[merkle.Node, bytes] = {}
        self.leaves: list[bytes] = []
        for leaf in leaves:
            self.append([leaf])

    def append(self, leaves: list[bytes]) -> None:
        size = len(self.leaves)
        edge = {n: self.nodes[n] for n in merkle.right_edge(size)}
        self.nodes.update(merkle.extend(size, edge, leaves))
        self.leaves += leaves

    def get(self, wanted):
        return [self.nodes[n] for n in wanted]

    def head(self, key=KEY, size: int | None = None, origin: str = CFG.origin) -> str:
        size = len(self.leaves) if size is None else size
        return checkpoint(key, origin, size, merkle.root(size, self.get), 1_700_000_000_000 + size)


def leaves(n: int) -> list[bytes]:
    return [f"leaf-{i}".encode() for i in range(n)]


def test_roots_and_every_proof_match_rfc_6962_for_every_size_up_to_40():
    tree = MemoryTree(leaves(40))
    for size in range(1, 41):
        root = merkle.root(size, tree.get)
        assert root == merkle.reference_root(tree.leaves[:size])
        for index in range(size):
            proof = merkle.inclusion_proof(index, size, tree.get)
            assert len(proof) <= (size - 1).bit_length()
            verify_inclusion(index, size, leaf_hash(tree.leaves[index]), proof, root)
        for first in range(1, size + 1):
            verify_consistency(first, size, merkle.root(first, tree.get), root,
                               merkle.consistency_proof(first, size, tree.get))


def test_batched_appends_build_the_same_tree_as_single_ones():
    one_by_one, batched = MemoryTree(leaves(37)), MemoryTree()
    for start in range(0, 37, 5):
        batched.append(leaves(37)[start:start + 5])
    assert batched.nodes == one_by_one.nodes


def test_rfc_6962_known_answers():
    """Hashes of the RFC 6962 reference test vectors (certificate-transparency-go)."""
    assert merkle.root(0, lambda w: []).hex() == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    assert leaf_hash(b"").hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d")
    vectors = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243",
                                          "5051525354555657", "606162636465666768696a6b6c6d6e6f")]
    assert merkle.reference_root(vectors).hex() == (
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")
    assert MemoryTree(vectors).head().split("\n")[2] == base64.b64encode(
        merkle.reference_root(vectors)).decode()


@pytest.mark.parametrize("tamper", ["leaf", "proof", "index", "root"])
def test_inclusion_fails_for_anything_altered(tamper):
    tree = MemoryTree(leaves(13))
    index, size = 6, 13
    leaf, proof, root = leaf_hash(tree.leaves[index]), merkle.inclusion_proof(index, 13, tree.get), \
        merkle.root(13, tree.get)
    if tamper == "leaf":
        leaf = leaf_hash(b"edited")
    elif tamper == "proof":
        proof[1] = bytes(32)
    elif tamper == "index":
        index = 7
    else:
        root = node_hash(root, root)
    with pytest.raises(VerificationError):
        verify_inclusion(index, size, leaf, proof, root)


@pytest.mark.parametrize("rewrite", ["edit", "remove", "reorder", "truncate"])
def test_a_rewritten_history_is_not_consistent_with_a_head_seen_before(rewrite):
    """The operator rebuilds the log after changing an old entry and signs it: a client
    holding the earlier head detects it."""
    original = leaves(20)
    seen = MemoryTree(original[:12])
    changed = list(original)
    if rewrite == "edit":
        changed[3] = b"backdated"
    elif rewrite == "remove":
        del changed[5]
    elif rewrite == "reorder":
        changed[2], changed[3] = changed[3], changed[2]
    else:
        changed = changed[:8] + [b"new-1", b"new-2", b"new-3", b"new-4", b"new-5"]
    forged = MemoryTree(changed)
    with pytest.raises(VerificationError):
        verify_consistency(12, len(changed), merkle.root(12, seen.get),
                           merkle.root(len(changed), forged.get),
                           merkle.consistency_proof(12, len(changed), forged.get))


def test_signed_heads_verify_only_under_the_log_key_and_unaltered():
    tree = MemoryTree(leaves(5))
    text = tree.head()
    head = verify_checkpoint(text, KEY.public_key())
    assert (head.tree_size, head.root_hash) == (5, merkle.root(5, tree.get))
    with pytest.raises(VerificationError, match="no signature by the log's key"):
        verify_checkpoint(text, OTHER.public_key())
    altered = text.replace("\n5\n", "\n4\n", 1)
    with pytest.raises(VerificationError, match="does not verify"):
        verify_checkpoint(altered, KEY.public_key())


def test_leaves_hold_no_id_pseudonym_or_digest_and_open_only_with_their_salt():
    leaf, salt = make_leaf(receipt_id="r-1", account_ref="ref-secret", uri_sha256="ab" * 32,
                           object_class="output", requested_s=1.5, verified_s=2.25,
                           result="verified_gone")
    text = leaf.decode()
    assert "r-1" not in text and "ref-secret" not in text and "ab" * 32 not in text
    fields = json.loads(leaf)
    assert set(fields) == {"v", "object_class", "requested_ms", "verified_ms", "result",
                           "subject"}
    assert fields["subject"] == subject_commitment(salt_hex=salt, receipt_id="r-1",
                                                   account_ref="ref-secret", uri_sha256="ab" * 32)
    again, other_salt = make_leaf(receipt_id="r-1", account_ref="ref-secret",
                                  uri_sha256="ab" * 32, object_class="output", requested_s=1.5,
                                  verified_s=2.25, result="verified_gone")
    assert other_salt != salt and json.loads(again)["subject"] != fields["subject"]  # unlinkable


def _receipt(tree: MemoryTree, index: int, opening: dict, receipt_id: str) -> dict:
    leaf = tree.leaves[index]
    return {"receipt_id": receipt_id, "head": {"checkpoint": tree.head()},
            "objects": [{"leaf_index": index, "leaf": base64.b64encode(leaf).decode(),
                         "leaf_hash": leaf_hash(leaf).hex(), "opening": opening,
                         "inclusion_proof": [p.hex() for p in merkle.inclusion_proof(
                             index, len(tree.leaves), tree.get)]}]}


def test_a_receipt_verifies_alone_and_every_forgery_is_named():
    leaf, salt = make_leaf(receipt_id="r-9", account_ref="ref", uri_sha256="cd" * 32,
                           object_class="input", requested_s=1, verified_s=2,
                           result="verified_gone")
    tree = MemoryTree([*leaves(9), leaf, *leaves(3)])
    opening = {"salt": salt, "account_ref": "ref", "uri_sha256": "cd" * 32}
    public = parse_public_key(public_key_b64(KEY.public_key()))
    good = _receipt(tree, 9, opening, "r-9")
    report = verify_receipt(good, public)
    assert report.ok and report.objects_verified == 1, report.problems

    another = _receipt(tree, 9, opening, "r-other")  # someone else's leaf shown as mine
    assert "does not open" in " ".join(verify_receipt(another, public).problems)
    edited = json.loads(json.dumps(good))
    edited["objects"][0]["leaf"] = base64.b64encode(leaf.replace(b"verified_gone",
                                                                 b"not_verified")).decode()
    assert "edited" in " ".join(verify_receipt(edited, public).problems)
    wrong_key = verify_receipt(good, parse_public_key(public_key_b64(OTHER.public_key())))
    assert not wrong_key.ok and "head" in wrong_key.problems[0]

    seen_tree = MemoryTree(tree.leaves[:6])
    consistency = {"proof": [p.hex() for p in merkle.consistency_proof(6, 13, tree.get)]}
    assert verify_receipt(good, public, [(seen_tree.head(), consistency)]).ok
    forked = MemoryTree([b"other", *tree.leaves[1:6]])
    report = verify_receipt(good, public, [(forked.head(), consistency)])
    assert not report.ok and "history was rewritten" in report.problems[0]


def _monitor_state() -> MonitorState:
    return MonitorState(CFG.origin, public_key_b64(KEY.public_key()))


def test_the_monitor_accepts_a_growing_log_and_alarms_on_fork_shrink_rewrite_and_key():
    tree = MemoryTree(leaves(10))
    state = _monitor_state()

    def proofs(t: MemoryTree):
        return lambda first, second: [p.hex() for p in merkle.consistency_proof(first, second,
                                                                                 t.get)]

    assert observe(state, tree.head(), proofs(tree)) == []
    tree.append(leaves(17)[10:])
    assert observe(state, tree.head(), proofs(tree)) == [] and len(state.heads) == 2

    fork = MemoryTree([*leaves(16), b"forked"])  # same size, another root, validly signed
    assert any("fork" in a for a in observe(state, fork.head(), proofs(fork)))
    shrunk = MemoryTree(leaves(12))
    assert any("shrank" in a for a in observe(state, shrunk.head(), proofs(shrunk)))
    rewritten = MemoryTree([b"edited", *leaves(25)[1:]])
    assert any("does not extend" in a for a in observe(state, rewritten.head(),
                                                       proofs(rewritten)))
    assert any("pinned key" in a for a in observe(state, tree.head(key=OTHER), proofs(tree)))
    assert len(state.heads) == 2  # nothing that alarmed was kept
    grown = MemoryTree(leaves(30))
    assert observe(state, grown.head(), proofs(grown)) == []


def test_a_signer_signs_only_sizes_older_than_the_settle_time():
    """No head covers appends younger than Redis's AOF fsync window (a crash could lose
    them, and a signed head past the survivors would read as a truncation)."""
    from pipeline.state.tlog import SettledSize

    settled = SettledSize(2.0)
    assert settled.observe(100.0, 5) == 0
    assert settled.observe(101.0, 9) == 0
    assert settled.observe(102.0, 12) == 5
    assert settled.observe(103.5, 12) == 9
    assert settled.observe(110.0, 20) == 12
    assert len(settled.samples) <= 3


def test_a_production_config_refuses_to_run_without_a_valid_signing_key(monkeypatch):
    from pipeline.transparency.heads import log_public_key

    monkeypatch.delenv(CFG.signing_key_env, raising=False)
    with pytest.raises(ValueError, match="EPHEMERA_TLOG_SIGNING_KEY is not set.*production"):
        signing_key(CFG, ["storage.yaml outputs: s3"])
    monkeypatch.setenv(CFG.signing_key_env, base64.b64encode(b"short").decode())
    with pytest.raises(ValueError, match="32 bytes"):
        signing_key(CFG, [])
    seed = bytes(range(32))
    monkeypatch.setenv(CFG.signing_key_env, base64.b64encode(seed).decode())
    key = signing_key(CFG, ["storage.yaml outputs: s3"])
    pinned_other = CFG.model_copy(update={"public_key": public_key_b64(OTHER.public_key())})
    with pytest.raises(ValueError, match="does not match"):
        signing_key(pinned_other, [])
    pinned = CFG.model_copy(update={"public_key": public_key_b64(key.public_key())})
    monkeypatch.delenv(CFG.signing_key_env)
    # With the key pinned, the ingress serves it without holding the signing key.
    assert public_key_b64(log_public_key(pinned, ["x"])) == public_key_b64(key.public_key())
