"""A real `paytoken-backend serve` on this machine, set up with the operator's CLI as a deployment would be: for
`make demo` and the tests.

    be = LocalBackend.create(work, issuer_pub_file, passphrase, bank_url=..., bank_secret=...)
    be.url, be.tokens["provisioning"], ...;  be.stop()

start_server / stop_server / free_port are the pieces (the server in its own process group, its workers with it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from paytoken_host.backend.keys import PASSPHRASE_ENV

CLI = [sys.executable, "-m", "paytoken_host.backend.cli"]
ROLES = ("provisioning", "treasury", "auditor")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db_url: str, key_path: str, port: int, env: dict[str, str], workers: int = 1,
                 log: str | None = None, timeout: float = 30) -> subprocess.Popen:
    """`paytoken-backend serve` on 127.0.0.1:port with `env` (the passphrase, PAYTOKEN_* settings), answering
    /health; RuntimeError if it exits or does not answer within `timeout` seconds."""
    import httpx

    proc = subprocess.Popen(CLI + ["serve", "--db", db_url, "--backend-key", key_path, "--port", str(port),
                                   "--workers", str(workers), "--log-level", "error"],
                            env=env, stdout=subprocess.DEVNULL, start_new_session=True,
                            stderr=open(log or os.devnull, "ab"))  # noqa: SIM115 (the child owns it)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"paytoken-backend serve exited with {proc.returncode}"
                               + (f" (see {log})" if log else ""))
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    stop_server(proc)
    raise RuntimeError(f"paytoken-backend serve did not answer within {timeout:g} s")


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stops the server and its worker processes (its own process group, started for it)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


@dataclass
class LocalBackend:
    url: str
    db_url: str
    tokens: dict[str, str]  # operator tokens by role (provisioning, treasury, auditor)
    proc: subprocess.Popen

    @classmethod
    def create(cls, work: Path, issuer_pub: Path, passphrase: str, bank_url: str | None = None,
               bank_secret: str | None = None, background_interval: float = 0.0) -> LocalBackend:
        """In `work`: a backend key (`paytoken-backend backend-key`), the SQLite database trusting the issuer
        (`init --issuer-pub`), an operator token per role (`token`), then the server on a free port; with
        bank_url the background worker delivers the outbox to it every background_interval seconds."""
        work.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, PASSPHRASE_ENV: passphrase}
        db_url = f"sqlite:///{work / 'backend.db'}"
        key = work / "backend.key"

        def cli(*args: str) -> str:
            proc = subprocess.run(CLI + list(args), env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"paytoken-backend {args[0]} failed: {proc.stderr.strip()}")
            return proc.stdout.strip()

        cli("backend-key", "--out", str(key))
        cli("init", "--db", db_url, "--issuer-pub", str(issuer_pub))
        tokens = {role: cli("token", "--db", db_url, "--name", f"local-{role}", "--role", role) for role in ROLES}
        settings = {"PAYTOKEN_BACKGROUND_INTERVAL": str(background_interval)}
        if bank_url:
            settings.update(PAYTOKEN_BANK_URL=bank_url, PAYTOKEN_BANK_SECRET=bank_secret or "")
        port = free_port()
        proc = start_server(db_url, str(key), port, {**env, **settings}, log=str(work / "server.log"))
        return cls(f"http://127.0.0.1:{port}", db_url, tokens, proc)

    def stop(self) -> None:
        stop_server(self.proc)

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
