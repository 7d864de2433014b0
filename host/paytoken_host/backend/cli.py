"""`paytoken-backend`: the operator's command line. Exit codes: 0 done, 1 refused or failed (with the reason on
stderr), 2 wrong usage."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys

from paytoken_host.backend import auth, db, migrate
from paytoken_host.backend.config import Config
from paytoken_host.backend.keys import PASSPHRASE_ENV, create_key_file, read_public
from paytoken_host.backend.service import ISSUER_SETTING, Backend
from paytoken_host.backend.verify import Reject

DEFAULT_DB = os.environ.get("PAYTOKEN_DB", Config.db_url)


def _passphrase(confirm: bool) -> bytes:
    value = os.environ.get(PASSPHRASE_ENV)
    if value:
        return value.encode()
    if not sys.stdin.isatty():
        raise SystemExit(f"set {PASSPHRASE_ENV} (no terminal to ask on)")
    first = getpass.getpass("passphrase: ")
    if confirm and getpass.getpass("again: ") != first:
        raise SystemExit("passphrases differ")
    return first.encode()


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2))


def cmd_init(a: argparse.Namespace) -> int:
    engine = db.make_engine(a.db)
    migrate.upgrade(engine)
    with db.write_tx(engine) as conn:
        current = db.get_setting(conn, ISSUER_SETTING)
        if a.issuer_pub:
            pub = read_public(a.issuer_pub).hex()
            if current and current != pub and not a.force:
                print("the database already trusts another issuer key (use --force to replace it)", file=sys.stderr)
                return 1
            db.set_setting(conn, ISSUER_SETTING, pub)
        elif not current:
            print("warning: no issuer key yet; run init again with --issuer-pub FILE", file=sys.stderr)
    print(f"database ready: {a.db}")
    return 0


def cmd_key(a: argparse.Namespace) -> int:
    try:
        create_key_file(a.out, _passphrase(confirm=True))
    except FileExistsError:
        print(f"{a.out} exists: refusing to overwrite a key", file=sys.stderr)
        return 1
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(f"{a.what} key written to {a.out} (mode 0600, encrypted); public key in {a.out}.pub")
    return 0


def _backend(a: argparse.Namespace) -> Backend:
    return Backend(db.make_engine(a.db), None)


def cmd_token(a: argparse.Namespace) -> int:
    import time

    engine = db.make_engine(a.db)
    with db.write_tx(engine) as conn:
        token = auth.create_token(conn, a.name, a.role, int(time.time()))
    print(token)
    return 0


def cmd_devices(a: argparse.Namespace) -> int:
    _print(_backend(a).devices())
    return 0


def cmd_balances(a: argparse.Namespace) -> int:
    result = _backend(a).balances()
    _print(result)
    return 0 if result["balanced"] else 1


def cmd_alerts(a: argparse.Namespace) -> int:
    _print(_backend(a).alerts(a.limit))
    return 0


def cmd_expire(a: argparse.Namespace) -> int:
    print(f"refunded {_backend(a).settlement.expire()} expired payments")
    return 0


def cmd_outbox(a: argparse.Namespace) -> int:
    from paytoken_host.backend import outbox

    secret = os.environ.get("PAYTOKEN_BANK_SECRET")
    if not secret:
        print("set PAYTOKEN_BANK_SECRET", file=sys.stderr)
        return 1
    ok, failed = outbox.deliver_due(db.make_engine(a.db), a.bank_url, secret.encode())
    print(f"delivered {ok}, failed {failed}")
    return 0 if not failed else 1


def cmd_serve(a: argparse.Namespace) -> int:
    import uvicorn

    config = Config.from_env()
    config = Config(**{**config.__dict__, "db_url": a.db, "backend_key": a.backend_key or config.backend_key})
    os.environ.update(config.to_env())
    if not os.environ.get(PASSPHRASE_ENV):
        print(f"set {PASSPHRASE_ENV} to the backend key's passphrase", file=sys.stderr)
        return 1
    uvicorn.run("paytoken_host.backend.api:app_from_env", factory=True, host=a.host, port=a.port,
                workers=a.workers, log_level=a.log_level, access_log=False, proxy_headers=True,
                forwarded_allow_ips=a.forwarded_allow_ips)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paytoken-backend", description="paytoken settlement backend")
    sub = p.add_subparsers(dest="command", required=True)

    def with_db(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--db", default=DEFAULT_DB, help="database URL: sqlite:///file.db or "
                        "postgresql+psycopg://user@host/db (default: $PAYTOKEN_DB or %(default)s)")
        return sp

    s = with_db(sub.add_parser("serve", help="run the HTTP API (uvicorn)"))
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (stateless; share the db)")
    s.add_argument("--backend-key", default=None, help=f"backend signing key file (passphrase: ${PASSPHRASE_ENV})")
    s.add_argument("--log-level", default="warning")
    s.add_argument("--forwarded-allow-ips", default="127.0.0.1",
                   help="load balancers whose X-Forwarded-For is trusted (the upload rate limit is per client)")
    s.set_defaults(fn=cmd_serve)

    s = with_db(sub.add_parser("init", help="create or migrate the database; trust an issuer key"))
    s.add_argument("--issuer-pub", help="the issuer's public key file (hex SEC1, from issuer-key)")
    s.add_argument("--force", action="store_true", help="replace a different issuer key already trusted")
    s.set_defaults(fn=cmd_init)

    for what in ("issuer", "backend"):
        s = sub.add_parser(f"{what}-key", help=f"create the {what}'s P-256 key file, encrypted at rest (0600)")
        s.add_argument("--out", required=True, help="key file to create (FILE.pub gets the public key)")
        s.set_defaults(fn=cmd_key, what=what)

    s = with_db(sub.add_parser("token", help="create an operator API token (printed once, stored as a hash)"))
    s.add_argument("--name", required=True)
    s.add_argument("--role", required=True, choices=auth.ROLES)
    s.set_defaults(fn=cmd_token)

    with_db(sub.add_parser("devices", help="list devices")).set_defaults(fn=cmd_devices)
    with_db(sub.add_parser("balances", help="account balances and the journal check (exit 1 if unbalanced)")
            ).set_defaults(fn=cmd_balances)
    s = with_db(sub.add_parser("alerts", help="latest alerts: forks, rejections, revocations"))
    s.add_argument("--limit", type=int, default=100)
    s.set_defaults(fn=cmd_alerts)
    with_db(sub.add_parser("expire", help="refund sent-unconfirmed payments past their expiry")
            ).set_defaults(fn=cmd_expire)
    s = with_db(sub.add_parser("outbox", help="deliver due outbox events to the bank once"))
    s.add_argument("--bank-url", required=True)
    s.set_defaults(fn=cmd_outbox)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        return a.fn(a)
    except Reject as e:
        print(e.reason, file=sys.stderr)
        return 1
    except Exception as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
