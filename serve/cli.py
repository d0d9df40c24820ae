"""The ``ephemera`` command. Options may come before or after the subcommand.

  ephemera serve [--config-dir DIR] [--workdir DIR]   run the service until Ctrl-C
  ephemera deploy-config [--config-dir DIR] [--out F] [--redis-url URL]
                                                       write the Serve config (serve deploy, KubeRay)
  ephemera tune POOL [--max-batch-cost N] [--max-wait-ms MS] [--max-concurrent-batches N]
                [--max-attempts N] [--stage-timeout-s S] [--address ADDR]
                                                       change batching live (no restart)
  ephemera status [--address ADDR]                     replicas, queue depth, batch fill, purge lag
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
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from pipeline.core.config import CONFIG_DIR, load_settings
from pipeline.core.errors import EphemeraError


def _serve(args: argparse.Namespace) -> int:
    from serve.launcher import start_service

    settings = load_settings(args.config_dir)
    with start_service(settings, workdir=Path(args.workdir)) as service:
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

    from pipeline.state.job_store import JobStore
    from pipeline.storage.base import StoreSet, open_store, open_stores

    settings = load_settings(args.config_dir)
    redis_url = args.redis_url or settings.service.redis_url
    if redis_url is None:
        raise ValueError("no Redis to talk to: give --redis-url, or set redis_url in "
                         "service.yaml (the embedded one lives only while the service runs)")
    stores = (StoreSet.single(open_store(args.store_url)) if args.store_url
              else open_stores(settings.storage))
    return settings, JobStore(redis.Redis.from_url(redis_url)), stores


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
    from pipeline.state import keys
    from pipeline.state.receipts import verify_chain

    _, jobs, _ = _backends(args)
    problems = verify_chain(jobs.redis)
    if problems:
        print("deletion ledger TAMPERED:", *problems, sep="\n  ")
        return 1
    print(f"deletion ledger intact: {jobs.redis.llen(keys.RECEIPT_CHAIN)} entries, hash chain verified")
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
    settings = load_settings(args.config_dir)
    print(f"configs OK: {len(settings.styles.styles)} styles, inputs on "
          f"{settings.storage.inputs}, outputs on {settings.storage.outputs}")
    return 0


def _storage_check(args: argparse.Namespace) -> int:
    from pipeline.storage.base import open_stores
    from pipeline.storage.posture import check_storage

    settings = load_settings(args.config_dir)
    stores = open_stores(settings.storage)
    problems = check_storage(settings.storage, stores)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        return 1
    print(f"storage OK: {len(stores.all())} store(s) checked")
    return 0


def _connect(args: argparse.Namespace) -> None:
    """Join the running cluster (a local `ephemera serve` included)."""
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the local launcher's setting
    ray.init(address=args.address, log_to_driver=False, logging_level="ERROR",
             ignore_reinit_error=True)


def _tune(args: argparse.Namespace) -> int:
    from serve.tuning import retune

    changes = {name: value for name, value in (
        ("max_batch_cost", args.max_batch_cost), ("max_wait_ms", args.max_wait_ms),
        ("max_concurrent_batches", args.max_concurrent_batches),
        ("max_attempts", args.max_attempts), ("stage_timeout_s", args.stage_timeout_s),
    ) if value is not None}
    if not changes:
        raise ValueError("nothing to change: give at least one of --max-batch-cost, "
                         "--max-wait-ms, --max-concurrent-batches, --max-attempts, "
                         "--stage-timeout-s")
    _connect(args)
    applied = retune(args.pool, changes)
    print(f"{args.pool}: now {applied} (applied to running replicas, no restart)")
    return 0


def _status(args: argparse.Namespace) -> int:
    import redis

    from pipeline.state.job_store import JobStore
    from pipeline.state.metrics import render_status, service_metrics
    from serve.tuning import service_status

    _connect(args)
    deployments = service_status()
    redis_url = args.redis_url or load_settings(args.config_dir).service.redis_url
    metrics = service_metrics(JobStore(redis.Redis.from_url(redis_url))) if redis_url else None
    print(render_status(deployments, metrics))
    return 0


def _deploy_config(args: argparse.Namespace) -> int:
    import yaml

    from serve.app import serve_config

    settings = load_settings(args.config_dir)
    app_args = {"config_dir": args.config_dir}
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

    settings = load_settings(args.config_dir)
    manifest = stage_model(Path(args.src), args.dest, settings.storage)
    size = sum(f.size_bytes for f in manifest.files)
    print(f"staged {len(manifest.files)} files ({size} bytes) at {args.dest}")
    print(f"manifest sha256: {manifest.sha256}  (pin it in models.yaml)")
    return 0


def _models_fetch(args: argparse.Namespace) -> int:
    from pipeline.core.config import resolve_path
    from pipeline.models.model_store import ModelStoreError, fetch_model

    settings = load_settings(args.config_dir)
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


def _openapi(args: argparse.Namespace) -> int:
    import json

    from serve.api import openapi_document

    text = json.dumps(openapi_document(), indent=1, sort_keys=True) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ephemera", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-dir", default=str(CONFIG_DIR), help="folder of YAML configs")
    # Every subcommand also takes --config-dir after its name (SUPPRESS keeps the one
    # given before the subcommand when none comes after it).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config-dir", default=argparse.SUPPRESS, help="folder of YAML configs")
    cluster = argparse.ArgumentParser(add_help=False)
    cluster.add_argument("--address", default="auto", help="Ray cluster to join (default: auto)")
    backends = argparse.ArgumentParser(add_help=False)  # commands working on Redis + store
    backends.add_argument("--redis-url", help="overrides service.yaml redis_url")
    backends.add_argument("--store-url", help="overrides service.yaml store_url")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", parents=[common], help="run the service on local Ray")
    serve_p.add_argument("--workdir", default="data", help="embedded Redis data folder")
    serve_p.set_defaults(func=_serve)
    deploy = sub.add_parser("deploy-config", parents=[common],
                            help="write the Serve config file for these configs")
    deploy.add_argument("--out", help="file to write (default: standard output)")
    deploy.add_argument("--redis-url", help="put this Redis in the app's args")
    deploy.set_defaults(func=_deploy_config)
    tune = sub.add_parser("tune", parents=[common, cluster],
                          help="change a pool's batching on the running service")
    tune.add_argument("pool", choices=["face", "diffusion", "runner"])
    tune.add_argument("--max-batch-cost", type=int)
    tune.add_argument("--max-wait-ms", type=float)
    tune.add_argument("--max-concurrent-batches", type=int)
    tune.add_argument("--max-attempts", type=int)
    tune.add_argument("--stage-timeout-s", type=float)
    tune.set_defaults(func=_tune)
    status = sub.add_parser("status", parents=[common, cluster], help="what the service is doing")
    status.add_argument("--redis-url", help="overrides service.yaml redis_url")
    status.set_defaults(func=_status)
    retention = sub.add_parser("retention", help="retention operations")
    retention_sub = retention.add_subparsers(dest="action", required=True)
    for name, func, text in (
        ("sweep", _sweep, "purge what is past its deadline"),
        ("reconcile", _reconcile, "delete stored inputs/face data with no live record"),
        ("verify-ledger", _verify_ledger, "check the deletion receipts' hash chain"),
    ):
        retention_sub.add_parser(name, parents=[common, backends], help=text).set_defaults(
            func=func)
    privacy = sub.add_parser("privacy", help="users' privacy requests")
    privacy_sub = privacy.add_subparsers(dest="action", required=True)
    privacy_sub.add_parser("report", parents=[common, backends],
                           help="open requests and any past a deadline").set_defaults(
        func=_privacy_report)
    usage = sub.add_parser("usage", help="usage data")
    usage_sub = usage.add_subparsers(dest="action", required=True)
    agg = usage_sub.add_parser("aggregate", parents=[common, backends],
                               help="de-identified aggregates for sharing (Parquet)")
    agg.add_argument("--out", required=True, help="the Parquet file to write")
    agg.set_defaults(func=_usage_aggregate)
    storage = sub.add_parser("storage", help="object stores")
    storage_sub = storage.add_subparsers(dest="action", required=True)
    storage_sub.add_parser("check", parents=[common],
                           help="check every bucket's posture").set_defaults(func=_storage_check)
    models = sub.add_parser("models", help="the model store")
    models_sub = models.add_subparsers(dest="action", required=True)
    stage = models_sub.add_parser("stage", parents=[common],
                                  help="copy a model into the store, write its manifest")
    stage.add_argument("src", help="a save_pretrained folder or a single weights file")
    stage.add_argument("dest", help="a folder, s3://bucket/prefix or gs://bucket/prefix")
    stage.set_defaults(func=_models_stage)
    fetch = models_sub.add_parser("fetch", parents=[common],
                                  help="fetch a model into the local cache and verify it")
    fetch.add_argument("location")
    fetch.add_argument("--sha256", help="the manifest hash to insist on")
    fetch.set_defaults(func=_models_fetch)
    convert = models_sub.add_parser("convert-ip-adapter", parents=[common],
                                    help="a published IP-Adapter .bin as one safetensors file")
    convert.add_argument("src")
    convert.add_argument("dest")
    convert.set_defaults(func=_models_convert)
    openapi = sub.add_parser("openapi", help="print or write the OpenAPI document")
    openapi.add_argument("--out", help="file to write (default: stdout)")
    openapi.set_defaults(func=_openapi)
    config = sub.add_parser("config", help="configuration")
    config_sub = config.add_subparsers(dest="action", required=True)
    config_sub.add_parser("check", parents=[common], help="validate configs").set_defaults(
        func=_check)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, EphemeraError) as exc:  # config errors name the file and the field
        print(f"ephemera: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
