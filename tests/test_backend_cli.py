"""`paytoken-backend`, the operator's CLI: keys encrypted at rest, init with Alembic, tokens, listings, exit codes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization

from paytoken import wire
from paytoken_host.backend import cli, db, keys
from paytoken_host.backend.service import Backend
from tests.backend_rig import World

SUBCOMMANDS = ["serve", "init", "issuer-key", "backend-key", "token", "devices", "balances", "alerts", "expire",
               "outbox"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "paytoken_host.backend.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


@pytest.mark.parametrize("sub", [None, *SUBCOMMANDS])
def test_help_everywhere(sub, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*([sub] if sub else []), "--help"])
    assert e.value.code == 0 and "usage: paytoken-backend" in capsys.readouterr().out


def test_wrong_usage_exits_2():
    assert run().returncode == 2  # the module as a program, as the console script runs it
    with pytest.raises(SystemExit) as e:
        cli.main(["token", "--db", "sqlite://", "--name", "x", "--role", "king"])
    assert e.value.code == 2


def test_keys_init_tokens_and_listings(tmp_path):
    env = {"PAYTOKEN_KEY_PASSPHRASE": "correct horse battery"}
    key = tmp_path / "issuer.key"
    r = run("issuer-key", "--out", str(key), env=env)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    pem = key.read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in pem
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(pem, None)  # useless without the passphrase
    loaded = keys.load_key_file(key, b"correct horse battery")
    pub = (tmp_path / "issuer.key.pub").read_text().strip()
    assert keys.read_public(tmp_path / "issuer.key.pub").hex() == pub
    assert run("issuer-key", "--out", str(key), env=env).returncode == 1  # never overwrites a key
    assert run("issuer-key", "--out", str(tmp_path / "k2"), env={"PAYTOKEN_KEY_PASSPHRASE": "short"}).returncode == 1

    url = f"sqlite:///{tmp_path}/cli.db"
    r = run("init", "--db", url, "--issuer-pub", str(tmp_path / "issuer.key.pub"))
    assert r.returncode == 0, r.stderr
    assert run("init", "--db", url).returncode == 0  # idempotent: migrations already at head
    other = tmp_path / "other.pub"
    other.write_text(World(tmp_path).issuer.public.hex())
    r = run("init", "--db", url, "--issuer-pub", str(other))
    assert r.returncode == 1 and "another issuer" in r.stderr

    r = run("token", "--db", url, "--name", "station-1", "--role", "provisioning")
    token = r.stdout.strip()
    assert r.returncode == 0 and token.startswith("ptk_")
    with db.read_tx(db.make_engine(url)) as conn:
        stored = [row.token_hash for row in conn.execute(db.api_tokens.select())]
    assert token.encode() not in b"".join(stored) and len(stored) == 1  # only its hash is kept

    from paytoken_host.protocol import Issuer, Limits, sec1

    issuer = Issuer(loaded)
    dev_key = keys.create_key_file(tmp_path / "dev.key", b"passphrase-1")
    cert = issuer.issue(os.urandom(8), wire.ROLE_PAYER, sec1(dev_key.public_key()), None, Limits(), 0, 2**32 - 1)
    backend = Backend(db.make_engine(url), keys.create_key_file(tmp_path / "backend.key", b"passphrase-2"),
                      clock=lambda: 1_790_000_000)
    backend.register(cert)
    backend.issue_voucher(wire.decode_cert(cert).device_id, 2_500)
    r = run("devices", "--db", url)
    assert r.returncode == 0 and json.loads(r.stdout)[0]["offline_balance"] == 2_500
    r = run("balances", "--db", url)
    assert r.returncode == 0 and json.loads(r.stdout)["balanced"] is True
    assert run("alerts", "--db", url).returncode == 0
    assert "refunded 0" in run("expire", "--db", url).stdout
    assert run("outbox", "--db", url, "--bank-url", "http://127.0.0.1:9").returncode == 1  # no secret set
    assert cli.main(["balances", "--db", "sqlite:////nonexistent/dir/x.db"]) == 1
