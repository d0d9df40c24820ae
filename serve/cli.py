"""The ``ephemera`` command.

  ephemera serve [--config-dir DIR] [--workdir DIR]   run the service until Ctrl-C
  ephemera retention sweep [--redis-url URL]           purge every object past its deadline
  ephemera retention reconcile [--redis-url URL]       delete orphans of crashes from the store
  ephemera retention verify-ledger [--redis-url URL]   detect tampering with deletion receipts
  ephemera storage check [--config-dir DIR]            check every bucket's settings
  ephemera config check [--config-dir DIR]             validate the YAML files and exit
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from pipeline.config import CONFIG_DIR, load_settings


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

    from pipeline.jobs import JobStore
    from pipeline.storage import StoreSet, open_store, open_stores

    settings = load_settings(args.config_dir)
    redis_url = args.redis_url or settings.service.redis_url
    if redis_url is None:
        raise ValueError("no Redis to talk to: give --redis-url, or set redis_url in "
                         "service.yaml (the embedded one lives only while the service runs)")
    stores = (StoreSet.single(open_store(args.store_url)) if args.store_url
              else open_stores(settings.storage))
    return settings, JobStore(redis.Redis.from_url(redis_url)), stores


def _sweep(args: argparse.Namespace) -> int:
    from pipeline.retention import sweep_due

    settings, jobs, store = _backends(args)
    receipts = sweep_due(store, jobs.ledger, owner="cli", cfg=settings.retention)
    print(f"purged and verified {len(receipts)} objects past their deadline")
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    from pipeline.retention import reconcile

    settings, jobs, store = _backends(args)
    receipts = reconcile(store, jobs.ledger, owner="cli", cfg=settings.retention)
    orphans = sum(r.object_class == "orphan" for r in receipts)
    print(f"reconciled: {orphans} orphans and {len(receipts) - orphans} overdue objects "
          "deleted and verified gone")
    return 0


def _verify_ledger(args: argparse.Namespace) -> int:
    from pipeline.receipts import CHAIN_KEY, verify_chain

    _, jobs, _ = _backends(args)
    problems = verify_chain(jobs.redis)
    if problems:
        print("deletion ledger TAMPERED:", *problems, sep="\n  ")
        return 1
    print(f"deletion ledger intact: {jobs.redis.llen(CHAIN_KEY)} entries, hash chain verified")
    return 0


def _check(args: argparse.Namespace) -> int:
    settings = load_settings(args.config_dir)
    print(f"configs OK: {len(settings.styles.styles)} styles, inputs on "
          f"{settings.storage.inputs}, outputs on {settings.storage.outputs}")
    return 0


def _storage_check(args: argparse.Namespace) -> int:
    from pipeline.posture import check_storage
    from pipeline.storage import open_stores

    settings = load_settings(args.config_dir)
    stores = open_stores(settings.storage)
    problems = check_storage(settings.storage, stores)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        return 1
    print(f"storage OK: {len(stores.all())} store(s) checked")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ephemera", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-dir", default=str(CONFIG_DIR), help="folder of YAML configs")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run the service on local Ray")
    serve_p.add_argument("--workdir", default="data", help="embedded Redis data folder")
    serve_p.set_defaults(func=_serve)
    retention = sub.add_parser("retention", help="retention operations")
    retention_sub = retention.add_subparsers(dest="action", required=True)
    for name, func, text in (
        ("sweep", _sweep, "purge what is past its deadline"),
        ("reconcile", _reconcile, "delete stored inputs/face data with no live record"),
        ("verify-ledger", _verify_ledger, "check the deletion receipts' hash chain"),
    ):
        action = retention_sub.add_parser(name, help=text)
        action.add_argument("--redis-url", help="overrides service.yaml redis_url")
        action.add_argument("--store-url", help="overrides service.yaml store_url")
        action.set_defaults(func=func)
    storage = sub.add_parser("storage", help="object stores")
    storage_sub = storage.add_subparsers(dest="action", required=True)
    storage_sub.add_parser("check", help="check every bucket's posture").set_defaults(
        func=_storage_check)
    config = sub.add_parser("config", help="configuration")
    config_sub = config.add_subparsers(dest="action", required=True)
    config_sub.add_parser("check", help="validate configs").set_defaults(func=_check)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # config errors name the file and the field
        print(f"ephemera: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
