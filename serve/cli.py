"""The ``ephemera`` command.

Options: every option of a command may stand anywhere on the line, before the first command
word, between two (``ephemera retention --redis-url URL sweep``) or after the last, as
``--opt VALUE`` or ``--opt=VALUE``; given twice, the later one wins; an option the command
does not take is an error wherever it stands. Paths: a relative ``--config-dir`` (and
``--workdir``) is relative to the app root (the folder holding pipeline/ and configs/), as
the Serve config's ``args.config_dir`` is, never to the current directory; files a command
reads or writes for you (``--out``, ``--write``, SRC, DEST) are relative to the current
directory.

  ephemera serve [--config-dir DIR] [--workdir DIR]   run the service until Ctrl-C
  ephemera deploy-config [--config-dir DIR] [--out F] [--redis-url URL]
                                                       write the Serve config (serve deploy, KubeRay);
                                                       config_dir is written relative to the app root
  ephemera tune POOL [--max-batch-cost N] [--max-wait-ms MS] [--max-concurrent-batches N]
                [--max-attempts N] [--stage-timeout-s S] [--address ADDR]
                [--write FILE [--dry-run | --file-only]]
                                                       change batching live (no restart);
                                                       --write also edits the Serve config or
                                                       RayService manifest FILE and its
                                                       batching.yaml, so the tune sticks
  ephemera status [--address ADDR]                     replicas, queue depth, batch fill, purge lag
                                                       (status and tune use Ray token auth when
                                                       they find a token: RAY_AUTH_TOKEN,
                                                       RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token;
                                                       RAY_AUTH_MODE, if set, wins)
  ephemera retention sweep [--redis-url URL]           purge every object past its deadline
  ephemera retention reconcile [--redis-url URL]       delete orphans of crashes from the store
  ephemera retention verify-ledger [--redis-url URL]   detect tampering with deletion receipts
  ephemera privacy report [--redis-url URL]            open privacy requests; exit 1 if one is late
  ephemera usage aggregate --out FILE [--redis-url URL]
                                                       de-identified usage aggregates (Parquet)
  ephemera storage check [--config-dir DIR]            check every bucket's settings
  ephemera models stage SRC DEST                       copy a model folder or file into the
                                                       model store and write its manifest
  ephemera models fetch LOCATION [--sha256 H]          fetch and verify into the local cache
  ephemera models convert-ip-adapter SRC.bin DEST.safetensors
                                                       a published .bin adapter as safetensors
  ephemera config check [--config-dir DIR]             validate the YAML files and exit
  ephemera openapi [--out FILE]                        the API contract (docs/openapi.json)
  ephemera eval MANIFEST --out RESULTS [--config-dir DIR] [--address ADDR]
                                                       offline evaluation of the face and
                                                       diffusion stages on Ray Data (Parquet
                                                       in and out; a local Ray unless ADDR)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import APP_ROOT, load_settings, portable_path, resolve_path
from pipeline.core.errors import EphemeraError
from pipeline.core.records import Pool


def _serve(args: argparse.Namespace) -> int:
    from serve.launcher import start_service

    settings = load_settings(args.config_dir)
    with start_service(settings, workdir=resolve_path(args.workdir)) as service:
        print(f"ephemera serving at {service.base_url} (Ctrl-C stops)", flush=True)
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        try:
            while not stop:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


def _backends(args: argparse.Namespace):
    """Redis and the store from the configs, overridable on the command line."""
    import redis

    from pipeline.state.cluster_secret import check_process_secrets
    from pipeline.state.job_store import JobStore
    from pipeline.storage.base import StoreSet, open_store, open_stores

    settings = load_settings(args.config_dir, require_pins=False)
    redis_url = args.redis_url or settings.service.redis_url
    if redis_url is None:
        raise ValueError("no Redis to talk to: give --redis-url, or set redis_url in "
                         "service.yaml (the embedded one lives only while the service runs)")
    stores = (StoreSet.single(open_store(args.store_url)) if args.store_url
              else open_stores(settings.storage))
    client = redis.Redis.from_url(redis_url)
    # Receipts, usage aggregates and deletions compute pseudonyms: the secrets first (a
    # --redis-url off loopback counts as a production marker, like one in service.yaml).
    check_process_secrets(settings.model_copy(update={"service": settings.service.model_copy(
        update={"redis_url": redis_url})}), client)
    return settings, JobStore(client), stores


def _sweep(args: argparse.Namespace) -> int:
    from pipeline.retention.purge import sweep_due

    settings, jobs, store = _backends(args)
    receipts = sweep_due(store, jobs.ledger, owner="cli", cfg=settings.retention)
    print(f"purged and verified {len(receipts)} objects past their deadline")
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    from pipeline.retention.purge import reconcile

    settings, jobs, store = _backends(args)
    receipts = reconcile(store, jobs.ledger, owner="cli", cfg=settings.retention)
    orphans = sum(r.object_class == "orphan" for r in receipts)
    print(f"reconciled: {orphans} orphans and {len(receipts) - orphans} overdue objects "
          "deleted and verified gone")
    return 0


def _verify_ledger(args: argparse.Namespace) -> int:
    """The full audit of the deletion log: leaves, nodes, every kept head (and the receipt
    chain from before the log, if not yet migrated)."""
    from pipeline.state import keys
    from pipeline.state.receipts import verify_chain
    from pipeline.state.tlog import TransparencyLog, audit
    from pipeline.transparency.heads import log_public_key

    settings, jobs, _ = _backends(args)
    log = TransparencyLog(jobs.redis)
    public = log_public_key(settings.retention.transparency, settings.production_markers)
    problems = audit(log, public) + verify_chain(jobs.redis)
    if problems:
        print("deletion ledger TAMPERED:", *problems, sep="\n  ")
        return 1
    chained = jobs.redis.llen(keys.RECEIPT_CHAIN)
    print(f"deletion ledger intact: {log.size()} entries in the transparency log, "
          f"{len(log.head_texts())} signed heads verified"
          + (f", {chained} chain entries awaiting migration" if chained else ""))
    return 0


def _migrate_chain(args: argparse.Namespace) -> int:
    from pipeline.state.tlog import migrate_chain

    _, jobs, _ = _backends(args)
    print(f"carried {migrate_chain(jobs.redis)} receipt chain entries into the log")
    return 0


def _export_heads(args: argparse.Namespace) -> int:
    """Every kept signed head, as the monitor's witness file (JSON)."""
    from pipeline.state.tlog import TransparencyLog
    from pipeline.transparency.heads import log_public_key, public_key_b64
    from pipeline.transparency.monitor import MonitorState

    settings, jobs, _ = _backends(args)
    cfg = settings.retention.transparency
    public = public_key_b64(log_public_key(cfg, settings.production_markers))
    state = MonitorState(cfg.origin, public, TransparencyLog(jobs.redis).head_texts())
    state.save(Path(args.out))
    print(f"wrote {len(state.heads)} signed heads to {args.out}")
    return 0


def _verify_receipt(args: argparse.Namespace) -> int:
    """The standalone verifier (pipeline/transparency/verifier.py) on a saved receipt."""
    from pipeline.transparency import verifier

    argv = [args.receipt, args.key] + ([args.seen] if args.seen else [])
    return verifier.main(argv)


def _monitor(args: argparse.Namespace) -> int:
    """Fetch the head every --interval-s, --rounds times; exit 1 on the first alarm."""
    from pipeline.transparency.monitor import MonitorState, http_source, observe

    token_env = args.token_env or "EPHEMERA_API_TOKEN"
    token = os.environ.get(token_env)
    key, head, consistency = http_source(args.url, token)
    state_path = Path(args.state)
    state = MonitorState.load(state_path)
    if state is None:
        pinned = args.public_key or key()["public_key"]
        state = MonitorState(key()["origin"], pinned)
    for round_ in range(args.rounds):
        if round_:
            time.sleep(args.interval_s)
        checkpoint = head()
        alarms = observe(state, checkpoint, consistency)
        if alarms:
            print(*alarms, sep="\n")
            return 1
        state.save(state_path)
        size = checkpoint.split("\n")[1]
        print(f"head ok: {size} entries, consistent with {len(state.heads)} heads seen",
              flush=True)
    return 0


def _privacy_report(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from pipeline.privacy.rights import PrivacyRequests, late_requests

    _, jobs, _ = _backends(args)
    requests = PrivacyRequests(jobs.redis)
    requests.settle_deletions()
    now = time.time()
    pending = requests.open_requests()
    late = late_requests(pending, now)

    def day(t: float | None) -> str:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d") if t else "-"

    print(f"{len(pending)} open privacy requests, {len(late)} late")
    print(f"{'request':<34}{'kind':<10}{'received':<12}{'acknowledged':<14}{'ack due':<12}"
          f"{'complete due':<14}")
    for r in pending:
        print(f"{r.request_id:<34}{r.kind:<10}{day(r.received_s):<12}"
              f"{day(r.acknowledged_s):<14}{day(r.ack_due_s):<12}{day(r.complete_due_s):<14}")
    for r, why in late:
        print(f"LATE {r.request_id} ({r.kind}): {why}")
    return 1 if late else 0


def _usage_aggregate(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from pipeline.privacy.rights import excluded_from_sharing
    from pipeline.privacy.usage import aggregate, read_events

    settings, jobs, stores = _backends(args)
    events = read_events(stores.outputs)
    table = aggregate(events, opted_out_refs=excluded_from_sharing(jobs.redis),
                      min_group_size=settings.retention.usage_min_group_size)
    pq.write_table(table, args.out)
    print(f"{events.num_rows} usage events -> {table.num_rows} groups of at least "
          f"{settings.retention.usage_min_group_size} accounts, written to {args.out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    settings = load_settings(args.config_dir)  # as the service starts: model pins included
    print(f"configs OK: {len(settings.styles.styles)} styles, inputs on "
          f"{settings.storage.inputs}, outputs on {settings.storage.outputs}")
    return 0


def _storage_check(args: argparse.Namespace) -> int:
    from pipeline.storage.base import open_stores
    from pipeline.storage.posture import check_storage

    settings = load_settings(args.config_dir, require_pins=False)
    stores = open_stores(settings.storage)
    problems = check_storage(settings.storage, stores)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        return 1
    print(f"storage OK: {len(stores.all())} store(s) checked")
    return 0


def _connect(args: argparse.Namespace) -> None:
    """Join the running cluster (a local `ephemera serve` included), with token auth when
    the environment holds the cluster's token (``client_auth_mode``)."""
    import os

    import ray
    from ray._raylet import Config  # type: ignore[attr-defined]

    from serve.launcher import RAY_TOKEN_SOURCES, client_auth_mode

    if ray.is_initialized():  # already joined (in-process use): keep that connection
        return
    mode = client_auth_mode(os.environ, Path.home())
    os.environ["RAY_AUTH_MODE"] = mode
    # Ray reads RAY_AUTH_MODE into its cached config when first imported; refresh it, as
    # Ray's own token-auth setup does, so the mode decided here is the one it connects with.
    Config.initialize("")
    try:
        ray.init(address=args.address, log_to_driver=False, logging_level="ERROR")
    except ConnectionError as exc:
        hint = ("; check that the token is this cluster's" if mode == "token" else
                f"; if it runs token authentication, give its token as {RAY_TOKEN_SOURCES}")
        raise ValueError(f"could not join the Ray cluster at {args.address} with "
                         f"RAY_AUTH_MODE={mode} ({exc}){hint}") from None


def _auto_tune(args: argparse.Namespace) -> dict[str, Any] | None:
    """Sweep the pool's batching on the running app; the chosen setting, or None (the
    original setting is put back) when none meets the p95 target."""
    import json

    from serve import autotune
    from serve.tuning import (
        POOL_DEPLOYMENTS,
        deployed_app_config,
        retune,
        service_status,
        tuned_config,
    )

    if args.pool == "runner":
        raise ValueError("--auto sweeps a GPU pool's batching: face or diffusion")
    _connect(args)
    settings = load_settings(args.config_dir, require_pins=False)
    token_env = args.token_env or settings.service.api_token_env
    token = os.environ.get(token_env) if token_env else None
    url = args.url
    if url is None:
        _, instance = deployed_app_config()
        http = instance["http_options"]
        url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
    deployment = POOL_DEPLOYMENTS[args.pool]
    original = dict(service_status()[deployment]["user_config"])
    if args.replicas:
        entry = next(d for d in deployed_app_config()[0]["deployments"]
                     if d["name"] == deployment)
        original["num_replicas"] = entry.get("num_replicas", 1)
    def numbers(text: str | None) -> list[int]:
        return [int(v) for v in text.split(",")] if text else []

    grid = autotune.sweep_grid(numbers(args.costs), [float(w) for w in args.waits_ms.split(",")],
                               numbers(args.concurrent_batches), numbers(args.replicas))
    deployed, _ = deployed_app_config()
    for setting in grid:  # refuse a bad grid before measuring anything
        tuned_config(deployed, args.pool, setting)
    print(f"tuning {args.pool}: {len(grid)} settings x {args.jobs} jobs at "
          f"{args.offered_rps:g} jobs/s offered, p95 target {args.p95_target_s:g} s", flush=True)
    results = autotune.sweep(args.pool, grid, base_url=url, token=token,
                             offered_rps=args.offered_rps, jobs=args.jobs,
                             on_result=lambda r: print(
                                 f"  {r.setting}: {r.throughput_jobs_s:.3f} jobs/s, p95 "
                                 f"{r.p95_s:.2f} s, failed {r.failed}", flush=True))
    chosen = autotune.choose(results, args.p95_target_s)
    print(autotune.table(results, chosen, args.p95_target_s))
    if args.out:
        out = Path(args.out)
        out.write_text(json.dumps({"pool": args.pool, "p95_target_s": args.p95_target_s,
                                   "results": [r.row() for r in results],
                                   "chosen": chosen.setting if chosen else None}, indent=1))
        if autotune.plot(results, chosen, args.p95_target_s, out.with_suffix(".png"),
                         f"ephemera tune {args.pool} --auto"):
            print(f"wrote {out} and {out.with_suffix('.png')}")
    if chosen is None:
        retune(args.pool, {k: original[k] for k in grid[0] if k in original})
        print(f"no setting met p95 <= {args.p95_target_s:g} s with every job succeeding; "
              "the pool is back on its original batching", file=sys.stderr)
        return None
    print(f"chosen: {chosen.setting}")
    return chosen.setting


def _tune(args: argparse.Namespace) -> int:
    from serve.tuning import retune, tune_file

    changes = {name: value for name, value in (
        ("max_batch_cost", args.max_batch_cost), ("max_wait_ms", args.max_wait_ms),
        ("max_concurrent_batches", args.max_concurrent_batches),
        ("max_attempts", args.max_attempts), ("stage_timeout_s", args.stage_timeout_s),
    ) if value is not None}
    if args.auto:
        if changes or args.dry_run or args.file_only:
            raise ValueError("--auto picks the batching itself: give no knob, --dry-run or "
                             "--file-only with it")
        chosen = _auto_tune(args)
        if chosen is None:
            return 1
        changes = chosen
    if not changes:
        raise ValueError("nothing to change: give at least one of --max-batch-cost, "
                         "--max-wait-ms, --max-concurrent-batches, --max-attempts, "
                         "--stage-timeout-s")
    if (args.dry_run or args.file_only) and not args.write:
        raise ValueError("--dry-run and --file-only act on the file the cluster is deployed "
                         "from: give it with --write FILE")
    if args.dry_run and args.file_only:
        raise ValueError("--dry-run changes nothing and --file-only writes the files: give one")
    files = tune_file(Path(args.write), args.pool, changes, shown=args.write) \
        if args.write else None
    edits = files.edits if files else []
    for note in files.notes if files else []:
        print(f"ephemera: note: {note}", file=sys.stderr)
    if args.dry_run:
        print("".join(edit.diff() for edit in edits), end="")
        if not edits:
            print(f"no change: {args.write} already has these values")
        return 0
    if not args.file_only:
        _connect(args)
        applied = retune(args.pool, changes)
        print(f"{args.pool}: now {applied} (applied to running replicas, no restart)")
        if files and files.user_config != applied:
            print(f"ephemera: warning: {args.write} will hold {files.user_config} for "
                  f"{args.pool}, the running service {applied}: it was tuned without --write, "
                  "or deployed from another file", file=sys.stderr)
    for edit in edits:
        _write_atomically(edit.path, edit.after)
        print(f"wrote {edit.shown}")
    return 0


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path``'s text in one step (a failed write leaves the old file whole)."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _status(args: argparse.Namespace) -> int:
    import redis

    from pipeline.state.job_store import JobStore
    from pipeline.state.metrics import render_status, service_metrics
    from serve.tuning import service_status

    _connect(args)
    deployments = service_status()
    redis_url = args.redis_url or load_settings(
        args.config_dir, require_pins=False).service.redis_url
    metrics = service_metrics(JobStore(redis.Redis.from_url(redis_url))) if redis_url else None
    print(render_status(deployments, metrics))
    return 0


def _deploy_config(args: argparse.Namespace) -> int:
    import yaml

    from serve.app import serve_config

    # The Serve config holds nothing of models.yaml, and production's is generated before
    # its models are staged; the app it deploys checks the pins when it starts.
    settings = load_settings(args.config_dir, require_pins=False)
    config_dir = portable_path(args.config_dir)  # what build_from_args resolves back
    if Path(config_dir).is_absolute():
        print(f"ephemera: warning: {config_dir} is outside the app root {APP_ROOT}, so the "
              "Serve config names it by absolute path: it is not portable and works only "
              "where that path exists", file=sys.stderr)
    app_args = {"config_dir": config_dir}
    if args.redis_url:
        app_args["redis_url"] = args.redis_url
    text = yaml.safe_dump(serve_config(settings, args=app_args), sort_keys=False)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def _models_stage(args: argparse.Namespace) -> int:
    from pipeline.models.model_store import stage_model

    settings = load_settings(args.config_dir, require_pins=False)
    manifest = stage_model(Path(args.src), args.dest, settings.storage)
    size = sum(f.size_bytes for f in manifest.files)
    print(f"staged {len(manifest.files)} files ({size} bytes) at {args.dest}")
    print(f"manifest sha256: {manifest.sha256}  (pin it in models.yaml)")
    return 0


def _models_fetch(args: argparse.Namespace) -> int:
    from pipeline.models.model_store import ModelStoreError, fetch_model

    settings = load_settings(args.config_dir, require_pins=False)
    try:
        path = fetch_model(args.location, resolve_path(settings.models.model_cache_dir),
                           settings.storage, expected_sha256=args.sha256)
    except ModelStoreError as exc:
        print(f"ephemera: {exc}", file=sys.stderr)
        return 1
    print(f"verified copy at {path}")
    return 0


def _models_convert(args: argparse.Namespace) -> int:
    from pipeline.core.errors import ModelError
    from pipeline.models.diffusion import convert_ip_adapter_bin

    try:
        convert_ip_adapter_bin(Path(args.src), Path(args.dest))
    except (ModelError, OSError) as exc:
        print(f"ephemera: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.dest}; stage it with `ephemera models stage {args.dest} DEST`")
    return 0


def _eval(args: argparse.Namespace) -> int:
    """The service's stages over an operator's test set (actors/evaluation.py): no HTTP,
    no Redis; a local Ray for the run unless --address names a cluster."""
    from actors.evaluation import run_eval
    from pipeline.jobs.evaluation import render_summary

    settings = load_settings(args.config_dir)  # it loads the models: pins included
    if args.address != "auto":
        _connect(args)
    summary = run_eval(Path(args.manifest), Path(args.out), settings)
    print(render_summary(summary))
    print(f"wrote {args.out}")
    return 0


def _openapi(args: argparse.Namespace) -> int:
    import json

    from serve.api import openapi_document

    text = json.dumps(openapi_document(), indent=1, sort_keys=True) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0


@dataclass(frozen=True)
class Command:
    """One leaf command: what it runs, its options (option -> help, None: the shared
    help), its positionals (name -> add_argument keywords) and its required options."""

    func: Callable[[argparse.Namespace], int]
    help: str
    options: dict[str, str | None] = field(default_factory=dict)
    positionals: dict[str, dict[str, Any]] = field(default_factory=dict)
    required: tuple[str, ...] = ()


CONFIG_DIR_HELP = ("folder of YAML configs (default: configs); a relative path is relative to "
                   f"the app root ({APP_ROOT}), not to the current directory, here and in the "
                   "Serve config's args.config_dir alike")

# Every option takes one value, but for the flags (store_true); add_argument keywords and
# the shared help of each.
OPTIONS: dict[str, dict[str, Any]] = {
    "--config-dir": {"metavar": "DIR", "help": CONFIG_DIR_HELP},
    "--workdir": {"metavar": "DIR", "help": "embedded Redis data folder (default: data); "
                                            "relative to the app root, like --config-dir"},
    "--address": {"help": "Ray cluster to join (default: auto)"},
    "--redis-url": {"metavar": "URL", "help": "overrides service.yaml redis_url"},
    "--store-url": {"metavar": "URL", "help": "overrides service.yaml store_url"},
    "--out": {"metavar": "FILE", "help": "file to write (default: standard output)"},
    "--max-batch-cost": {"type": int, "metavar": "N"},
    "--max-wait-ms": {"type": float, "metavar": "MS"},
    "--max-concurrent-batches": {"type": int, "metavar": "N"},
    "--max-attempts": {"type": int, "metavar": "N"},
    "--stage-timeout-s": {"type": float, "metavar": "S"},
    "--sha256": {"metavar": "H", "help": "the manifest hash to insist on"},
    "--write": {"metavar": "FILE", "help": "also make the change in FILE, the Serve config "
                "or RayService manifest the cluster is deployed from, and in the batching.yaml "
                "of the config set it names (only the changed lines; comments stay)"},
    "--dry-run": {"action": "store_true", "help": "print the diff --write would make; change "
                  "nothing, neither the files nor the cluster (no Ray connection)"},
    "--auto": {"action": "store_true", "help": "sweep the pool's batching under generated "
               "traffic on the running app, apply the best setting meeting --p95-target-s"},
    "--offered-rps": {"type": float, "metavar": "R", "help": "--auto: jobs/s offered, "
                      "open loop (default 2)"},
    "--jobs": {"type": int, "metavar": "N", "help": "--auto: jobs per setting (default 16)"},
    "--p95-target-s": {"type": float, "metavar": "S", "help": "--auto: latency target "
                       "(default 30)"},
    "--costs": {"metavar": "LIST", "help": "--auto: max_batch_cost values (default 8,16,32)"},
    "--waits-ms": {"metavar": "LIST", "help": "--auto: max_wait_ms values (default "
                   "50,200,800)"},
    "--concurrent-batches": {"metavar": "LIST", "help": "--auto: max_concurrent_batches "
                             "values (default: leave as is)"},
    "--replicas": {"metavar": "LIST", "help": "--auto: replica counts, for a pool with "
                   "autoscaling off (default: leave as is)"},
    "--seen": {"metavar": "FILE", "help": "heads seen before, each with its consistency "
               "proof: [{checkpoint, consistency: {proof}}]"},
    "--url": {"metavar": "URL", "help": "the service's base URL"},
    "--state": {"metavar": "FILE", "help": "the monitor's state and witness file (JSON)"},
    "--public-key": {"metavar": "B64", "help": "pin this key (default: fetched on the "
                     "first run, then pinned in the state file)"},
    "--token-env": {"metavar": "NAME", "help": "variable holding the API bearer token"},
    "--interval-s": {"type": float, "metavar": "S", "help": "between two fetches"},
    "--rounds": {"type": int, "metavar": "N", "help": "fetches to make (default 1)"},
    "--file-only": {"action": "store_true", "help": "write the files, leave the running "
                    "cluster alone (a RayService: kubectl apply the manifest)"},
}
DEFAULTS: dict[str, Any] = {"config_dir": "configs", "workdir": "data", "address": "auto",
                            "dry_run": False, "file_only": False, "rounds": 1,
                            "interval_s": 10.0, "auto": False, "offered_rps": 2.0,
                            "jobs": 16, "p95_target_s": 30.0, "costs": "8,16,32",
                            "waits_ms": "50,200,800"}

_BACKENDS: dict[str, str | None] = {"--config-dir": None, "--redis-url": None,
                                    "--store-url": None}
_TUNE: dict[str, str | None] = {**dict.fromkeys((
    "--config-dir", "--address", "--max-batch-cost", "--max-wait-ms", "--max-concurrent-batches",
    "--max-attempts", "--stage-timeout-s", "--write", "--dry-run", "--file-only", "--auto",
    "--offered-rps", "--jobs", "--p95-target-s", "--costs", "--waits-ms", "--url",
    "--concurrent-batches", "--replicas",
    "--token-env")), "--out": "--auto: the sweep's results (JSON; a PNG beside it)"}

# name -> a Command, or (help, {name -> Command}) for a command with subcommands.
COMMANDS: dict[str, Command | tuple[str, dict[str, Command]]] = {
    "serve": Command(_serve, "run the service on local Ray",
                     {"--config-dir": None, "--workdir": None}),
    "deploy-config": Command(_deploy_config, "write the Serve config file for these configs",
                             {"--config-dir": None, "--out": None,
                              "--redis-url": "put this Redis in the app's args"}),
    "tune": Command(_tune, "change a pool's batching on the running service", _TUNE,
                    {"pool": {"choices": [p.value for p in Pool]}}),
    "status": Command(_status, "what the service is doing",
                      {"--config-dir": None, "--address": None, "--redis-url": None}),
    "retention": ("retention operations", {
        "sweep": Command(_sweep, "purge what is past its deadline", _BACKENDS),
        "reconcile": Command(_reconcile, "delete stored inputs/face data with no live record",
                             _BACKENDS),
        "verify-ledger": Command(_verify_ledger, "audit the deletion log: leaves, nodes, "
                                 "signed heads", _BACKENDS)}),
    "verify-receipt": Command(_verify_receipt, "verify a saved deletion receipt offline",
                              {"--seen": None},
                              {"receipt": {"help": "the receipt's JSON, as GET /v1/accounts/"
                                           "{a}/deletions/{r} returns it"},
                               "key": {"help": "the log's public key (base64), as GET "
                                              "/v1/transparency/key returns it"}}),
    "transparency": ("the deletion transparency log", {
        "monitor": Command(_monitor, "watch the log's heads; exit 1 on a fork or a rewrite",
                           {"--url": None, "--state": None, "--public-key": None,
                            "--token-env": None, "--interval-s": None, "--rounds": None},
                           required=("--url", "--state")),
        "heads": Command(_export_heads, "export the kept signed heads for witnesses",
                         {**_BACKENDS, "--out": "the JSON file to write"}, required=("--out",)),
        "migrate": Command(_migrate_chain, "carry the old receipt chain into the log",
                           _BACKENDS)}),
    "privacy": ("users' privacy requests", {
        "report": Command(_privacy_report, "open requests and any past a deadline",
                          _BACKENDS)}),
    "usage": ("usage data", {
        "aggregate": Command(_usage_aggregate, "de-identified aggregates for sharing (Parquet)",
                             {**_BACKENDS, "--out": "the Parquet file to write"},
                             required=("--out",))}),
    "storage": ("object stores", {
        "check": Command(_storage_check, "check every bucket's posture", {"--config-dir": None})}),
    "models": ("the model store", {
        "stage": Command(_models_stage, "copy a model into the store, write its manifest",
                         {"--config-dir": None},
                         {"src": {"help": "a save_pretrained folder or a single weights file"},
                          "dest": {"help": "a folder, s3://bucket/prefix or gs://bucket/prefix"}}),
        "fetch": Command(_models_fetch, "fetch a model into the local cache and verify it",
                         {"--config-dir": None, "--sha256": None}, {"location": {}}),
        "convert-ip-adapter": Command(_models_convert,
                                      "a published IP-Adapter .bin as one safetensors file",
                                      {"--config-dir": None}, {"src": {}, "dest": {}})}),
    "eval": Command(_eval, "evaluate the face and diffusion stages on a test set (Ray Data)",
                    {"--config-dir": None, "--out": "the results Parquet file to write",
                     "--address": "Ray cluster to run on (default: a local Ray for this run)"},
                    {"manifest": {"help": "Parquet manifest of test images (pipeline/jobs/"
                                          "evaluation.py: image_id, kind, style, image_uri or "
                                          "image_bytes)"}},
                    required=("--out",)),
    "openapi": Command(_openapi, "print or write the OpenAPI document",
                       {"--config-dir": None, "--out": None}),
    "config": ("configuration", {
        "check": Command(_check, "validate configs", {"--config-dir": None})}),
}


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


def _add_options(parser: argparse.ArgumentParser, options: dict[str, str | None]) -> None:
    """``options`` on ``parser`` with no default: a value given on the other side of a
    subcommand is kept, and defaults are filled in once parsing is done."""
    for option, text in options.items():
        keywords = {**OPTIONS[option], "default": argparse.SUPPRESS}
        if text is not None:
            keywords["help"] = text
        parser.add_argument(option, **keywords)


def _options_under(tree: Mapping[str, Command | tuple[str, dict[str, Command]]]
                   ) -> dict[str, str | None]:
    """Every option of every command in ``tree``, with its shared help."""
    found: dict[str, str | None] = {}
    for node in tree.values():
        leaves = [node] if isinstance(node, Command) else list(node[1].values())
        for leaf in leaves:
            found.update(dict.fromkeys(leaf.options))
    return {option: found[option] for option in OPTIONS if option in found}


def _add_commands(parser: argparse.ArgumentParser,
                  tree: Mapping[str, Command | tuple[str, dict[str, Command]]],
                  dest: str) -> None:
    sub = parser.add_subparsers(dest=dest, required=True)
    for name, node in tree.items():
        if isinstance(node, Command):
            leaf = sub.add_parser(name, help=node.help)
            _add_options(leaf, node.options)
            for positional, keywords in node.positionals.items():
                leaf.add_argument(positional, **keywords)
            leaf.set_defaults(func=node.func, _command=node)
        else:
            group = sub.add_parser(name, help=node[0])
            _add_options(group, _options_under(node[1]))
            _add_commands(group, node[1], "action")


def build_parser() -> argparse.ArgumentParser:
    """The ``ephemera`` parser. Use :func:`parse_args`: it also fills the defaults and
    refuses an option that the command given does not take."""
    parser = argparse.ArgumentParser(prog="ephemera", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_options(parser, _options_under(COMMANDS))
    _add_commands(parser, COMMANDS, "command")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` wherever its options sit; exits 2 (argparse's way) on an error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command = vars(args).pop("_command")
    words = " ".join(w for w in (args.command, getattr(args, "action", None)) if w)
    for option in OPTIONS:
        if option not in command.options and hasattr(args, _dest(option)):
            parser.error(f"`ephemera {words}` takes no {option}")
    missing = [o for o in command.required if not hasattr(args, _dest(o))]
    if missing:
        parser.error(f"`ephemera {words}` needs {', '.join(missing)}")
    for option in command.options:
        if not hasattr(args, _dest(option)):
            setattr(args, _dest(option), DEFAULTS.get(_dest(option)))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, EphemeraError) as exc:  # config errors name the file and the field
        print(f"ephemera: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
