"""Mutation check of the privacy promises: does some test fail when a promise breaks?

Each mutation below is a one-line, privacy-breaking change (skip a deadline, keep a key,
stop stripping, skip face data, widen a region, leave an object behind, disable
verification, ...). One at a time, it is applied to a fresh copy of the repository (the
files git tracks, plus uncommitted edits), and the tests that guard that promise run
against the copy (PYTHONPATH points at it, so Ray workers import the mutated code too).
A mutation is *caught* only when one of its named guard tests fails on an assertion (read
from pytest's JUnit XML): an error in setup or collection, another exception, a crash or a
timeout is reported as such, never as a catch. Every mutation must be caught: the script
exits 1 if one survives or errs.

Run (outside CI; about 10 minutes on a 2-core machine, most of it starting Ray):

    .venv/bin/python scripts/check_promises.py            # all
    .venv/bin/python scripts/check_promises.py --only spool-to-disk,constant-key

Two baseline runs of every selected test on the unmutated copy come first, and both must
pass: a test that fails (or flakes) without a mutation would "catch" everything. CI runs
it after the suite: `make check-promises` from `.ci/run`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"


@dataclass(frozen=True)
class Mutation:
    name: str
    promise: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the repository


T_SERVICE = "tests/integration/test_service.py"
T_RETENTION = "tests/integration/test_retention.py"
T_PRIVACY = "tests/integration/test_privacy_rights.py"
T_TLOG = "tests/unit/test_transparency.py"

MUTATIONS = [
    Mutation("api-ignores-device-key", "an upload is encrypted with the key on the user's device",
             "serve/api.py",
             'device_key = check_device_key(request.headers.get("x-device-key"))',
             'device_key = check_device_key(request.headers.get("x-device-key")) and bytes(32)',
             (f"{T_SERVICE}::test_a_stored_input_opens_with_the_header_key_and_with_no_other",)),
    Mutation("constant-key", "the stored object is unreadable without the device key",
             "pipeline/security/crypto.py",
             "    return _derive(device_key, _APP_INFO)",
             "    return _derive(bytes(32), _APP_INFO)",
             ("tests/unit/test_crypto.py",)),
    Mutation("provider-holds-app-key", "the storage provider never holds the ciphertext's key",
             "pipeline/security/crypto.py",
             "    return _derive(device_key, _PROVIDER_INFO)",
             "    return _derive(device_key, _APP_INFO)",
             ("tests/unit/test_crypto.py",)),
    Mutation("keep-photo-metadata", "metadata is stripped before anything is stored",
             "pipeline/media/ingest.py",
             "        png_bytes=encode_png(pixels),",
             "        png_bytes=data,",
             ("tests/unit/test_ingest.py", "tests/unit/test_media.py")),
    Mutation("keep-video-tags", "video tags (location, make, audio) are stripped",
             "pipeline/media/video.py",
             "    return CleanVideo(mp4_bytes=mp4_bytes, width_px=width, height_px=height, fps=fps,",
             "    return CleanVideo(mp4_bytes=data, width_px=width, height_px=height, fps=fps,",
             ("tests/unit/test_media.py",)),
    Mutation("no-input-deadline", "inputs are deleted by the hard ceiling",
             "pipeline/retention/purge.py",
             "        return created_s + cfg.input_ceiling_h * 3600.0",
             '        return float("inf")',
             (f"{T_RETENTION}::test_a_stuck_jobs_inputs_and_face_data_are_gone_by_their_ceilings",)),
    Mutation("no-face-data-deadline", "face data is deleted by the hard ceiling",
             "pipeline/retention/purge.py",
             "        return created_s + cfg.face_data_ceiling_h * 3600.0",
             '        return float("inf")',
             (f"{T_RETENTION}::test_a_stuck_jobs_inputs_and_face_data_are_gone_by_their_ceilings",)),
    Mutation("reconciler-skips-face-data", "orphaned face data is found and deleted",
             "pipeline/retention/purge.py",
             "    for prefix in (INPUT_PREFIX, FACE_PREFIX, WORK_PREFIX):",
             "    for prefix in (INPUT_PREFIX, WORK_PREFIX):",
             (f"{T_RETENTION}::test_reconciler_deletes_orphans_and_overdue_objects_only",)),
    Mutation("reconciler-skips-outputs", "orphaned outputs are found and deleted",
             "pipeline/retention/purge.py",
             "    receipts += _reconcile_outputs(store, ledger, chain, now_s=now_s)",
             "    pass",
             (f"{T_RETENTION}::test_reconciler_deletes_orphan_outputs_and_expired_usage_with_receipts",)),
    Mutation("delete-leaves-object", "a deletion leaves no object behind",
             "pipeline/storage/base.py",
             "    store.delete(key)\n    if store.exists(key):",
             "    pass\n    if False:",
             ("tests/unit/test_storage.py",)),
    Mutation("no-delete-verification", "every deletion is verified (HEAD 404) before a receipt",
             "pipeline/storage/base.py",
             "    if store.exists(key):\n        raise StorageError",
             "    if False:\n        raise StorageError",
             ("tests/unit/test_storage.py",)),
    Mutation("aws-outside-us", "AWS storage stays in a US region",
             "pipeline/core/config.py",
             "        if self.region not in US_AWS_REGIONS:",
             "        if not self.region:",
             ("tests/unit/test_residency.py",)),
    Mutation("ignore-country", "inputs live in the Google Cloud region closest to the user",
             "pipeline/storage/residency.py",
             "    return cfg.country_regions.get(country, cfg.fallback_region)",
             "    return cfg.fallback_region",
             ("tests/unit/test_residency.py",)),
    Mutation("delete-output-keeps-file", "deleting an output removes it promptly, verified",
             "pipeline/retention/deletion.py",
             "    requested_s = time.time()\n    delete_verified(*stores.locate(out.uri))",
             "    requested_s = time.time()\n    stores.locate(out.uri)",
             (f"{T_RETENTION}::test_delete_output_is_verified_and_receipted",)),
    Mutation("no-cache-control", "outputs are never cached by a proxy or browser",
             "serve/api.py",
             'headers={"Cache-Control": "private, no-store"})',
             "headers={})",
             (f"{T_SERVICE}::test_art_style_many_files_outputs_readable_from_any_device",)),
    Mutation("spool-to-disk", "plaintext uploads never touch a disk",
             "serve/api.py",
             "starlette.formparsers.MultiPartParser.spool_max_size = 1 << 40",
             "starlette.formparsers.MultiPartParser.spool_max_size = 1 << 20",
             (f"{T_SERVICE}::test_a_large_upload_leaves_no_plaintext_on_disk_while_it_is_read",)),
    Mutation("log-device-key", "a device key is never logged",
             "serve/api.py",
             "        device_key = check_device_key(request.headers.get(\"x-device-key\"))\n",
             "        device_key = check_device_key(request.headers.get(\"x-device-key\"))\n"
             "        log.warning(\"device key %s\", request.headers.get(\"x-device-key\"))\n",
             (f"{T_PRIVACY}::test_media_keys_embeddings_gps_and_account_ids_are_nowhere_they_should_not_be",)),
    Mutation("log-embedding", "face data is never logged",
             "pipeline/jobs/stages.py",
             "        face_data = identity.tobytes()\n",
             "        face_data = identity.tobytes()\n"
             "        log.warning(\"identity %s\", identity)\n",
             (f"{T_PRIVACY}::test_media_keys_embeddings_gps_and_account_ids_are_nowhere_they_should_not_be",)),
    Mutation("failed-purge-drops-record", "an object whose deletion fails is retried until gone",
             "pipeline/retention/purge.py",
             "            ledger.defer(rec.uri, time.time() + cfg.lease_s)",
             "            ledger.complete(rec)",
             ("tests/unit/test_purge.py",)),
    Mutation("sandbox-may-write-files", "an upload's decoder cannot write it to a file",
             "pipeline/media/sandbox.py",
             "    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # no file is ever written",
             "    pass",
             ("tests/security/test_hostile_media.py::"
              "test_the_child_writes_no_file_and_answers_in_checked_frames",)),
    Mutation("queued-job-may-succeed", "a job ends succeeded only after a runner ran it",
             "pipeline/core/records.py",
             "    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.FAILED}),",
             "    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.FAILED, "
             "JobStatus.SUCCEEDED}),",
             ("tests/integration/test_job_store.py::"
              "test_every_status_write_follows_the_declared_transitions",)),
    Mutation("dead-ingress-ignored", "inputs of a job cut by an ingress crash go in seconds",
             "pipeline/jobs/orchestration.py",
             "    if job.ingress_id and job.ingress_id not in live_ingresses:",
             "    if False:",
             ("tests/integration/test_faults.py::test_ingress_killed_mid_write_loses_nothing",)),
    Mutation("face-data-in-clear", "face data is stored only encrypted",
             "pipeline/retention/purge.py",
             "    store.put(key_from_uri(store, uri), crypto.encrypt(plain, item.device_key, uri=uri),",
             "    store.put(key_from_uri(store, uri), plain,",
             ("tests/integration/test_stages.py::test_face_stage_stores_only_encrypted_face_data_then_purge_removes_it",)),
    Mutation("minimised-record-keeps-account", "job records drop the account id after purge",
             "pipeline/state/job_store.py",
             'PERSONAL_JOB_FIELDS = ("account_id", "input_uris", "reason", "runner_id", "ingress_id")',
             'PERSONAL_JOB_FIELDS = ("input_uris", "reason", "runner_id", "ingress_id")',
             ("tests/integration/test_job_store.py::"
              "test_a_purged_job_loses_its_personal_fields_after_the_grace_then_goes",)),
    Mutation("usage-keeps-account-id", "usage data holds no personal data",
             "pipeline/privacy/usage.py",
             "day=day_of(now_s), account_ref=account_ref(item.account_id), kind=str(item.kind),",
             "day=day_of(now_s), account_ref=item.account_id, kind=str(item.kind),",
             (f"{T_PRIVACY}::test_usage_events_hold_no_personal_data_and_aggregates_honour_opt_outs",)),
    Mutation("child-not-blocked", "a child's account accepts no job after an age signal",
             "pipeline/privacy/rights.py",
             '    client.set(keys.blocked_account(account_ref(account_id)), "under_13")',
             "    pass",
             (f"{T_PRIVACY}::test_under_13_deletes_everything_with_a_receipt_and_blocks_the_account",)),
    Mutation("opt-out-ignored", "opted-out accounts are left out of shared aggregates",
             "pipeline/privacy/usage.py",
             '        if row["account_ref"] in opted_out_refs:',
             "        if False:",
             ("tests/unit/test_usage.py",)),
    Mutation("account-deletion-keeps-outputs", "deleting an account deletes every output",
             "pipeline/retention/deletion.py",
             "    for out in jobs.list_outputs(account_id):\n        keep_lock()\n"
             "        delete_verified(*stores.locate(out.uri))",
             "    for out in jobs.list_outputs(account_id):\n        keep_lock()\n"
             "        stores.locate(out.uri)",
             (T_RETENTION,)),
    # P12: the cluster's own promises.
    Mutation("unpinned-models-serve", "production serves only models pinned by sha256",
             "pipeline/core/config.py",
             "        if not production or models.diffusion_backend != \"diffusers\":",
             "        if True:",
             ("tests/unit/test_config.py",)),
    Mutation("metrics-token-opens-api", "Prometheus's token opens /metrics and nothing else",
             "serve/api.py",
             "    if metrics_sha256 and path == METRICS_PATH and method == \"GET\":",
             "    if metrics_sha256:",
             ("tests/unit/test_metrics_access.py",)),
    Mutation("cli-joins-without-token", "operator commands join the cluster with its token",
             "serve/launcher.py",
             "    return \"token\" if has_ray_token(environ, home) else \"disabled\"",
             "    return \"disabled\"",
             ("tests/unit/test_cli.py",)),
    Mutation("cpu-pool-on-gpu-machines", "CPU replicas never take a GPU machine's CPUs",
             "configs/production/serve.yaml",
             "      num_cpus: 1.0\n      num_gpus: 0.0\n      resources:\n        cpu_node: 0.01",
             "      num_cpus: 1.0\n      num_gpus: 0.0",
             ("tests/unit/test_deploy_files.py::test_cpu_pools_ask_for_cpu_machines",)),
    # P13: deletion that reaches every record, work data, fail closed.
    Mutation("lost-purge-call-waits-for-ceiling", "inputs go within seconds of a job's end "
             "even if the purge call is lost", "pipeline/state/job_store.py",
             "        self.ledger.expedite_job(job_id, PURGED_WITH_INPUTS, now)\n",
             "        pass\n",
             (f"{T_RETENTION}::test_a_lost_purge_call_is_recovered_by_the_sweep_within_seconds",)),
    Mutation("reconciler-skips-work-data", "a clip's orphaned work data is found and deleted",
             "pipeline/retention/purge.py",
             "    for prefix in (INPUT_PREFIX, FACE_PREFIX, WORK_PREFIX):",
             "    for prefix in (INPUT_PREFIX, FACE_PREFIX):",
             (f"{T_RETENTION}::test_reconciler_deletes_orphans_and_overdue_objects_only",)),
    Mutation("deletion-skips-minimised-jobs", "account deletion removes minimised job records",
             "pipeline/retention/deletion.py",
             "    return jobs.account_job_ids(account_id) + jobs.minimised_job_ids(account_id)",
             "    return jobs.account_job_ids(account_id)",
             (f"{T_RETENTION}::test_account_deletion_and_the_under_13_signal_remove_minimised"
              "_job_records",)),
    Mutation("export-get-writes-state", "a read of an unknown account writes nothing",
             "pipeline/privacy/rights.py",
             "    if not holds_anything(export):\n        return export",
             "    if False:\n        return export",
             (f"{T_RETENTION}::test_the_export_get_writes_nothing_for_an_unknown_id_and_no_raw"
              "_id_for_a_known_one",)),
    Mutation("one-cloud-store-runs-open", "nothing leaves the machine without the API token",
             "pipeline/core/config.py",
             "(f\"storage.yaml outputs: {storage.outputs}\", storage.outputs != \"local\"),",
             "(f\"storage.yaml outputs: {storage.outputs}\", False),",
             ("tests/unit/test_secrets.py::test_every_way_off_the_machine_needs_the_api_token",)),
    Mutation("other-secret-joins-cluster", "every process of a cluster uses one account secret",
             "pipeline/state/cluster_secret.py",
             "    if theirs != mine:",
             "    if theirs is None:",
             ("tests/unit/test_secrets.py::test_every_process_of_a_cluster_uses_the_same_account"
              "_secret",)),
    # P14: deletion a user can verify. Each check of the verifier, the monitor and the audit.
    Mutation("inclusion-unchecked", "a receipt's object is provably in the signed log",
             "pipeline/transparency/verifier.py",
             "    if r != root:\n        raise VerificationError(f\"inclusion proof of leaf",
             "    if False:\n        raise VerificationError(f\"inclusion proof of leaf",
             (f"{T_TLOG}::test_inclusion_fails_for_anything_altered",)),
    Mutation("consistency-unchecked", "a rewritten deletion history is detected",
             "pipeline/transparency/verifier.py",
             "    if fr != first_root:",
             "    if False:",
             (f"{T_TLOG}::test_a_rewritten_history_is_not_consistent_with_a_head_seen_before",)),
    Mutation("head-signature-unchecked", "only heads signed by the log's key are trusted",
             "pipeline/transparency/verifier.py",
             "            public_key.verify(blob[4:], body.encode())",
             "            pass",
             (f"{T_TLOG}::test_signed_heads_verify_only_under_the_log_key_and_unaltered",)),
    Mutation("leaf-subject-unchecked", "a receipt cannot show another deletion's leaf",
             "pipeline/transparency/verifier.py",
             '    if fields.get("subject") != expected:',
             "    if False:",
             (f"{T_TLOG}::test_a_receipt_verifies_alone_and_every_forgery_is_named",)),
    Mutation("monitor-misses-fork", "a monitor alarms on two roots for one size",
             "pipeline/transparency/monitor.py",
             "        if old.tree_size == new.tree_size and old.root_hash != new.root_hash:",
             "        if False:",
             (f"{T_TLOG}::test_the_monitor_accepts_a_growing_log_and_alarms_on_fork_shrink_"
              "rewrite_and_key",)),
    Mutation("monitor-misses-rewrite", "a monitor alarms on a rewritten history",
             "pipeline/transparency/monitor.py",
             "            check_heads(last, new, proof)",
             "            pass",
             (f"{T_TLOG}::test_the_monitor_accepts_a_growing_log_and_alarms_on_fork_shrink_"
              "rewrite_and_key",)),
    Mutation("audit-misses-edited-leaf", "the operator's audit finds an edited leaf",
             "pipeline/state/tlog.py",
             "            if leaf_hash(leaf) != node:",
             "            if False:",
             (f"{T_RETENTION}::test_every_purge_is_logged_and_tampering_is_detected",)),
    Mutation("leaf-names-the-account", "a public leaf reveals no account pseudonym",
             "pipeline/transparency/heads.py",
             '              "result": result,',
             '              "result": result, "account_ref": account_ref,',
             (f"{T_TLOG}::test_leaves_hold_no_id_pseudonym_or_digest_and_open_only_with_"
              "their_salt",)),
]


def copy_repository(into: Path) -> None:
    """The files git knows (tracked and untracked, not ignored), as they are now."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=REPO, capture_output=True, check=True)
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def apply(root: Path, mutation: Mutation) -> None:
    path = root / mutation.path
    text = path.read_text()
    if text.count(mutation.old) != 1:
        raise SystemExit(f"{mutation.name}: the code to mutate is not found exactly once in "
                         f"{mutation.path}; update scripts/check_promises.py")
    path.write_text(text.replace(mutation.old, mutation.new))


@dataclass(frozen=True)
class Outcome:
    """What one pytest run of a mutation's guard tests said, read from its JUnit XML."""

    verdict: str  # "pass" | "caught" | "error" | "timeout"
    test: str  # the guard test that failed on an assertion, or what went wrong
    seconds: float


# A test "fails on an assertion" when its failure is an AssertionError (a bare `assert`, or
# pytest.raises / pytest.fail reporting "DID NOT RAISE" and the like); any other exception,
# a setup or collection error, a crash or a timeout is an error, never a catch.
_ASSERTION = re.compile(r"^(?:assert\b|AssertionError\b|Failed\b)")


def _named(nodeid: str, tests: tuple[str, ...]) -> bool:
    """Is ``nodeid`` one of the guard tests (a node id, or any test of a named file)?"""
    return any(nodeid == t or nodeid.startswith(t + "::") or nodeid.startswith(t + "[")
               for t in tests)


def read_junit(path: Path, tests: tuple[str, ...]) -> tuple[str, str]:
    """("pass" | "caught" | "error", detail) from pytest's JUnit XML report."""
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return "error", "(no JUnit report: pytest did not run)"
    root = ET.parse(path).getroot()
    errors, caught = [], []
    for case in root.iter("testcase"):
        file = (case.get("file") or case.get("classname", "").replace(".", "/") + ".py")
        nodeid = f"{file}::{case.get('name', '')}"
        for failure in case.findall("failure"):
            message = (failure.get("message") or "").strip()
            if _ASSERTION.match(message) and _named(nodeid, tests):
                caught.append(nodeid)
            else:
                errors.append(f"{nodeid}: {message.splitlines()[0][:120] if message else 'failure'}")
        for error in case.findall("error"):
            message = (error.get("message") or "error").strip().splitlines()[0][:120]
            errors.append(f"{nodeid or 'collection'}: {message}")
    if errors:
        return "error", errors[0]
    if caught:
        return "caught", caught[0]
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    if not any(int(s.get("tests", 0)) for s in suites):
        return "error", "(no test ran)"
    return "pass", ""


def run_tests(root: Path, tests: tuple[str, ...], timeout_s: float) -> Outcome:
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    report = root / ".promises-junit.xml"
    report.unlink(missing_ok=True)
    started = time.monotonic()
    try:
        run = subprocess.run([str(PYTHON), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                              "-o", "addopts=", "-o", "junit_family=xunit2",
                              f"--junitxml={report}", *tests], cwd=root, env=env,
                             capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Outcome("timeout", f"(timed out after {timeout_s:.0f} s)",
                       time.monotonic() - started)
    seconds = time.monotonic() - started
    verdict, detail = read_junit(report, tests)
    if verdict == "pass" and run.returncode != 0:  # pytest failed in a way the XML lacks
        verdict, detail = "error", f"(pytest exit {run.returncode}) {run.stdout[-300:]}"
    return Outcome(verdict, detail, seconds)


def check_copy_is_imported(root: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(root)}
    where = subprocess.run([str(PYTHON), "-c", "import pipeline; print(pipeline.__file__)"],
                           cwd=root, env=env, capture_output=True, text=True, check=True)
    if not where.stdout.strip().startswith(str(root)):
        raise SystemExit(f"the copy is not what Python imports ({where.stdout.strip()})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated mutation names")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per test run")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    chosen = MUTATIONS
    if args.only:
        names = set(args.only.split(","))
        chosen = [m for m in MUTATIONS if m.name in names]
        if unknown := names - {m.name for m in chosen}:
            raise SystemExit(f"unknown mutation(s): {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="ephemera-promises-") as tmp:
        pristine = Path(tmp) / "pristine"
        copy_repository(pristine)
        check_copy_is_imported(pristine)
        if not args.skip_baseline:
            # Twice: a flaky guard test would otherwise be reported as catching mutations.
            tests = tuple(sorted({t for m in chosen for t in m.tests}))
            for run in (1, 2):
                outcome = run_tests(pristine, tests, args.timeout_s * 2)
                print(f"baseline {run}/2 ({len(tests)} test selections, unmutated): "
                      f"{outcome.verdict} {outcome.test} in {outcome.seconds:.0f} s",
                      flush=True)
                if outcome.verdict != "pass":
                    return 1
        rows: list[tuple[Mutation, Outcome]] = []
        for mutation in chosen:
            work = Path(tmp) / mutation.name
            shutil.copytree(pristine, work)
            apply(work, mutation)
            outcome = run_tests(work, mutation.tests, args.timeout_s)
            if outcome.verdict in ("error", "timeout"):
                # Said so, then run once more: an error tells nothing either way (a Ray
                # start that failed on a busy machine), and only the rerun's verdict counts.
                print(f"  {mutation.name}: {outcome.verdict} {outcome.test}; running it again",
                      flush=True)
                outcome = run_tests(work, mutation.tests, args.timeout_s)
            rows.append((mutation, outcome))
            print(f"  {mutation.name}: {outcome.verdict} {outcome.test} "
                  f"({outcome.seconds:.0f} s)", flush=True)
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'mutation':31} {'promise':57} {'caught by (tests/...), or what went wrong':s} (s)")
    for mutation, outcome in rows:
        where = {"caught": outcome.test.removeprefix("tests/"),
                 "pass": "NOT CAUGHT"}.get(outcome.verdict,
                                           f"{outcome.verdict.upper()}: {outcome.test}")
        print(f"{mutation.name:31} {mutation.promise[:57]:57} {where} ({outcome.seconds:.0f})")
    counts = {v: sum(o.verdict == v for _, o in rows) for v in ("caught", "pass", "error",
                                                                 "timeout")}
    print(f"\npromises: mutations {len(rows)}, caught {counts['caught']}, survived "
          f"{counts['pass']}, errors {counts['error']}, timeouts {counts['timeout']}")
    return 0 if counts["caught"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
