"""Double-entry journal: every movement of money is one entry whose lines sum to zero, and each account's
balance is the sum of its lines. Accounts: `bank` (the bank's side of the money held offline), `offline:<device>`
(a payer's offline balance as the backend sees it: vouchers minus settled spending) and `merchant:<device>`
(what settled payments owe a payee)."""

from __future__ import annotations

from sqlalchemy import Connection, func, insert, select

from paytoken_host.backend import db

BANK = "bank"


def offline(device_id: bytes) -> str:
    return "offline:" + device_id.hex()


def merchant(device_id: bytes) -> str:
    return "merchant:" + device_id.hex()


def open_accounts(conn: Connection, names: list[str]) -> None:
    have = set(conn.execute(select(db.accounts.c.name).where(db.accounts.c.name.in_(names))).scalars())
    missing = [{"name": n, "balance": 0} for n in names if n not in have]
    if missing:
        conn.execute(insert(db.accounts), missing)


def post(conn: Connection, kind: str, ref: str, lines: dict[str, int], now: int) -> int:
    """One balanced entry; the accounts must exist (opened at registration). Returns the entry id."""
    lines = {a: v for a, v in lines.items() if v}
    if sum(lines.values()) != 0:
        raise ValueError(f"unbalanced journal entry {kind} {ref}: {lines}")
    moves = [{"name": a, "balance": v} for a, v in sorted(lines.items())]
    if moves and conn.dialect.name == "postgresql":  # entry, lines and balances in one statement
        return db.pg_rows(conn, _PG_POST, [kind, ref, now, [m["name"] for m in moves], [m["balance"] for m in moves],
                                           *db.update_many_params("name", ("balance",), moves)])[0]["id"]
    entry = conn.execute(insert(db.journal_entries).values(kind=kind, ref=ref, created_at=now)).inserted_primary_key[0]
    if moves:
        db.insert_many(conn, db.journal_lines, [{"entry_id": entry, "account": m["name"], "amount": m["balance"]}
                                                for m in moves])
        db.update_many(conn, db.accounts, "name", ("balance",), moves, add=True)
    return entry


_PG_POST = (
    "WITH e AS (INSERT INTO journal_entries (kind, ref, created_at) VALUES (%s, %s, %s) RETURNING id), "
    "l AS (INSERT INTO journal_lines (entry_id, account, amount) SELECT e.id, v.account, v.amount "
    "FROM e, unnest(%b::varchar[], %b::bigint[]) WITH ORDINALITY AS v(account, amount, n) ORDER BY v.n), "
    f"a AS ({db.update_many_sql(db.accounts, 'name', ('balance',), add=True)}) SELECT id FROM e")


def balance(conn: Connection, name: str) -> int:
    return conn.execute(select(db.accounts.c.balance).where(db.accounts.c.name == name)).scalar() or 0


def check(conn: Connection) -> list[str]:
    """Problems found (empty when the books balance): unbalanced entries, account balances that are not the sum
    of their lines, offline balances below zero, and a ledger whose accounts do not sum to zero."""
    problems = []
    jl = db.journal_lines
    for entry, total in conn.execute(select(jl.c.entry_id, func.sum(jl.c.amount)).group_by(jl.c.entry_id)
                                     .having(func.sum(jl.c.amount) != 0)):
        problems.append(f"entry {entry} sums to {total}")
    sums = dict(conn.execute(select(jl.c.account, func.sum(jl.c.amount)).group_by(jl.c.account)).all())
    for name, bal in conn.execute(select(db.accounts.c.name, db.accounts.c.balance)):
        if int(sums.get(name, 0)) != bal:
            problems.append(f"account {name}: balance {bal}, lines sum to {sums.get(name, 0)}")
        if name.startswith("offline:") and bal < 0:
            problems.append(f"account {name}: negative offline balance {bal}")
    total = conn.execute(select(func.coalesce(func.sum(db.accounts.c.balance), 0))).scalar()
    if total != 0:
        problems.append(f"accounts sum to {total}, not 0")
    return problems
