"""The `carebroker` command."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from consent import cli as policy_cli
from fhir_server.auth import cli as auth_cli
from fhir_server.auth.demo import demo_instructions, register_demo
from fhir_server.auth.server import AuthServer
from fhir_server.config import AUTH_OFF_ENV, Settings
from fhir_server.demo import demo_resources
from fhir_server.loader import load
from fhir_server.service.interactions import FhirService
from fhir_server.storage.engine import create_engine, migrate
from fhir_server.storage.repository import Store

log = logging.getLogger("carebroker")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="carebroker", description="FHIR R4 care-record broker")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the FHIR server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--database", help="SQLAlchemy URL (default: $CAREBROKER_DATABASE_URL or "
                                          "sqlite:///carebroker.db in the working directory)")
    serve.add_argument("--demo", action="store_true", help="load the synthetic demo population first")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (stateless; share the database)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--auth", choices=("on", "off"), default="on",
                       help="'off' serves /fhir without tokens, with full access: local experiments only")

    migrate_cmd = sub.add_parser("migrate", help="create or upgrade the database schema, then exit")
    migrate_cmd.add_argument("--database")

    load_cmd = sub.add_parser("load", help="load Bulk Data NDJSON and Bundle JSON files (or folders of them)")
    load_cmd.add_argument("paths", nargs="+", type=Path, metavar="FILE_OR_DIR")
    load_cmd.add_argument("--database")
    load_cmd.add_argument("--batch", type=int, default=500, help="resources per database transaction")
    load_cmd.add_argument("--processes", type=int, help="worker processes (default: up to 2)")
    load_cmd.add_argument("--rejects", type=Path, default=Path("carebroker-rejects"),
                          help="folder for rejected.ndjson (replayable) and errors.ndjson")
    load_cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    auth_cli.add_parsers(sub)
    policy_cli.add_parsers(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env(database_url=args.database)

    engine = create_engine(settings.database_url)
    migrate(engine)
    service = FhirService(Store(engine))
    if reindexed := service.reindex_if_needed():
        log.info("search index rebuilt for %d resources", reindexed)
    service.store.refresh_statistics()
    if args.command == "migrate":
        log.info("schema of %s is up to date", engine.url.render_as_string(hide_password=True))
        return 0
    if args.command == "load":
        engine.dispose()
        return load_files(settings, args)
    if args.command in auth_cli.COMMANDS:
        status = auth_cli.run(args, service.store, settings)
        engine.dispose()
        return status
    if args.command in policy_cli.COMMANDS:
        status = policy_cli.run(args, service.store, settings)
        engine.dispose()
        return status
    if args.demo:
        load_demo(service)
        service.store.refresh_statistics()
        register_demo(service.store)
        print(demo_instructions(settings.public_base_url or f"http://{args.host}:{args.port}/fhir"),
              file=sys.stderr, flush=True)
    AuthServer(service.store, settings.auth_key_file).keys.ensure_current()  # the first start makes the key
    engine.dispose()
    return serve_forever(settings, args)


def load_demo(service: FhirService) -> None:
    """PUT the demo population: idempotent, so a second `--demo` start changes nothing."""
    resources = demo_resources()
    for res in resources:
        service.update(res["resourceType"], res["id"], res)
    log.info("demo data: %d resources loaded", len(resources))


def load_files(settings: Settings, args: argparse.Namespace) -> int:
    """`carebroker load`: exit status 1 if anything was rejected (it is kept in --rejects)."""
    try:
        outcome = load(args.paths, settings.database_url, args.rejects, args.batch, args.processes,
                       progress=not args.quiet)
    except FileNotFoundError as exc:
        print(f"carebroker load: {exc}", file=sys.stderr)
        return 2
    for note in outcome.skipped:
        print(f"skipped {note}", file=sys.stderr)
    kinds = ", ".join(f"{t} {n}" for t, n in sorted(outcome.by_type.items()))
    rate = outcome.loaded / outcome.elapsed if outcome.elapsed else 0.0
    print(f"loaded {outcome.loaded} resources in {outcome.elapsed:.1f} s ({rate:,.0f}/s): {kinds}", file=sys.stderr)
    if outcome.rejected:
        print(f"rejected {len(outcome.rejected)}: kept in {args.rejects}/rejected.ndjson, reasons in "
              f"{args.rejects}/errors.ndjson", file=sys.stderr)
        for r in outcome.rejected[:10]:
            print(f"  {r.source}:{r.line}: {r.status} {r.reason}", file=sys.stderr)
        return 1
    return 0


def serve_forever(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    os.environ["CAREBROKER_DATABASE_URL"] = settings.database_url
    os.environ.pop(AUTH_OFF_ENV, None)
    if args.auth == "off":  # the workers build their apps from the environment: tell them
        log.warning("*** --auth off: /fhir answers ANY request WITHOUT A TOKEN, with full access. "
                    "Local experiments only; never with real data. ***")
        os.environ[AUTH_OFF_ENV] = "by --auth off"
    print(f"carebroker: FHIR R4 server at http://{args.host}:{args.port}/fhir "
          f"(try http://{args.host}:{args.port}/fhir/metadata)", file=sys.stderr, flush=True)
    uvicorn.run("fhir_server.api.asgi:app_from_env", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level=args.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
