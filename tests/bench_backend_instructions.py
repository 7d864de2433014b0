"""The settlement backend's own cost per payment, in CPU instructions: a measure that does not drift with the
machine's speed, for comparing two versions of the upload path (`make bench`'s rates on this machine vary by
10-20% from one minute to the next; instruction counts by about 1%).

    .venv/bin/python -m tests.bench_backend_instructions [--db sqlite|postgresql]

Runs the upload path in-process (parse, certificates, verify_batch, settlement, writes; no HTTP) under valgrind's
cachegrind, for a few uploads and for more, and prints the difference per payment. The P-256 signature checks are
replaced by a function that accepts every signature, in this measuring process only: their cost is the bench's
limit, measured there; this tool measures everything else the worker does. The database's own CPU is not counted
(it runs in its own processes). Needs valgrind (Debian: apt-get install valgrind).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FEW, MORE = 3, 8  # uploads of 500 payments each: the difference is 2,500 payments


def _child(url: str, key_der: str, batches_file: str, uploads: int) -> None:
    """The measured process: `uploads` uploads of the saved batches through Backend.upload, signatures accepted."""
    import json

    from cryptography.hazmat.primitives import serialization

    from paytoken_host import protocol
    from paytoken_host.backend import api, db
    from paytoken_host.backend.service import Backend

    protocol.verifies = lambda key, raw: True  # noqa: ARG005 (the one thing not measured here: see the docstring)
    batches = json.loads(Path(batches_file).read_text())
    key = serialization.load_der_private_key(bytes.fromhex(key_der), None)
    backend = Backend(db.make_engine(url), key, upload_rate=10**9)
    api.tune_collector()  # as the server's workers run
    for body in batches[:uploads]:
        backend.check_rate("bench")
        status, result = backend.upload(body.encode())
        if status != 200 or result["settled"] != 500:
            raise SystemExit(f"upload failed: {status} {str(result)[:200]}")


def _instructions(kind: str, uploads: int, tmp: Path, key_der: str, batches_file: str, world) -> int:
    from tests import bench_backend as B
    from tests.backend_rig import make_database

    d = make_database(kind, tmp) if kind == "postgresql" else None
    url = d.url if d else f"sqlite:///{tmp}/instr-{uploads}.db"
    try:
        issuer, backend_key, payer_certs, payee_certs = world
        B.setup_database(url, issuer, backend_key, payer_certs, payee_certs)
        out = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                              sys.executable, "-m", "tests.bench_backend_instructions", "--child", url, key_der,
                              batches_file, str(uploads)], capture_output=True, text=True, check=False)
        m = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
        if out.returncode != 0 or not m:
            raise SystemExit(f"cachegrind run failed ({out.returncode}): {out.stderr[-800:]}")
        return int(m.group(1).replace(",", ""))
    finally:
        if d and d.cleanup:
            d.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", choices=("sqlite", "postgresql"), default="postgresql")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _child(a.child[0], a.child[1], a.child[2], int(a.child[3]))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind not found (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    import json

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from paytoken_host import protocol
    from tests import bench_backend as B
    from tests.backend_rig import pg_reachable

    if a.db == "postgresql" and not pg_reachable():
        print("PostgreSQL not reachable (PAYTOKEN_TEST_PG); use --db sqlite", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="paytoken-instr-"))
    try:
        print(f"signing {MORE} batches of {B.BATCH} payments...", flush=True)
        issuer = protocol.Issuer()
        backend_key = ec.generate_private_key(ec.SECP256R1())
        payer_certs, payee_certs, batches = B.make_batches(issuer, tmp, MORE)
        batches_file = tmp / "batches.json"
        batches_file.write_text(json.dumps(batches))
        key_der = backend_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()).hex()
        world = (issuer, backend_key, payer_certs, payee_certs)
        counts = []
        for n in (FEW, MORE):
            print(f"{n} uploads under cachegrind ({a.db})...", flush=True)
            counts.append(_instructions(a.db, n, tmp, key_der, str(batches_file), world))
        per = (counts[1] - counts[0]) / ((MORE - FEW) * B.BATCH)
        print(f"backend worker, {a.db}: {per:,.0f} instructions per payment (signature checks excluded)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")  # the measured processes: the same set and dict orders each run
    raise SystemExit(main())
