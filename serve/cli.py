"""The ``ephemera`` command.

  ephemera serve [--config-dir DIR] [--workdir DIR]   run the service until Ctrl-C
  ephemera retention sweep [--config-dir DIR]          purge every object past its deadline
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


def _sweep(args: argparse.Namespace) -> int:
    import redis

    from pipeline.ledger import RetentionLedger
    from pipeline.retention import sweep_due
    from pipeline.storage import open_store

    settings = load_settings(args.config_dir)
    if settings.service.redis_url is None:
        print("service.yaml has no redis_url: the embedded Redis lives only while the "
              "service runs, and its service sweeps by itself", file=sys.stderr)
        return 2
    ledger = RetentionLedger(redis.Redis.from_url(settings.service.redis_url))
    receipts = sweep_due(open_store(settings.service.store_url), ledger, owner="cli",
                         cfg=settings.retention)
    print(f"purged and verified {len(receipts)} objects past their deadline")
    return 0


def _check(args: argparse.Namespace) -> int:
    settings = load_settings(args.config_dir)
    print(f"configs OK: {len(settings.styles.styles)} styles, store {settings.service.store_url}")
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
    retention_sub.add_parser("sweep", help="purge what is past its deadline").set_defaults(func=_sweep)
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
