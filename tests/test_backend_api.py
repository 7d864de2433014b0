"""The HTTP API: who may call what (every protected endpoint without a credential, with a wrong one and with the
wrong role), a device reading only its own updates, replayed and stale device requests, upload size and rate
limits, malformed bodies, and the OpenAPI document."""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient

from paytoken import revocation, wire
from paytoken_host.backend.api import create_app
from paytoken_host.backend.config import Config
from tests.backend_rig import NOW, World, make_database, new_backend, pay, tokens, updates_auth


@pytest.fixture
def api(tmp_path):
    world = World(tmp_path)
    backend = new_backend(make_database("sqlite", tmp_path), world, upload_rate=1000)
    config = Config(max_upload_bytes=64 * 1024, background_interval=0)
    with TestClient(create_app(backend, config)) as client:
        yield world, backend, client, tokens(backend)
    backend.engine.dispose()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


DEV = "00" * 8
# (method, path, json body, roles allowed)
OPERATOR_ENDPOINTS = [
    ("POST", "/v1/devices", {"cert": "00"}, {"provisioning"}),
    ("GET", "/v1/devices", None, {"auditor", "provisioning", "treasury"}),
    ("POST", f"/v1/devices/{DEV}/revoke", {"reason": "x"}, {"provisioning"}),
    ("POST", f"/v1/devices/{DEV}/vouchers", {"amount": 1}, {"treasury"}),
    ("GET", "/v1/balances", None, {"auditor", "treasury"}),
    ("GET", "/v1/alerts", None, {"auditor"}),
    ("GET", "/v1/payments/" + "00" * 16, None, {"auditor", "treasury"}),
    ("POST", "/v1/expire", None, {"treasury"}),
    ("GET", "/metrics", None, {"auditor"}),
]


@pytest.mark.parametrize("method, path, body, allowed", OPERATOR_ENDPOINTS, ids=[e[1] for e in OPERATOR_ENDPOINTS])
def test_operator_endpoints_need_the_right_role(api, method, path, body, allowed):
    _, _, client, toks = api
    for headers in ({}, {"Authorization": "Bearer ptk_wrong"}, {"Authorization": "Basic abc"},
                    {"Authorization": "Bearer "}):
        r = client.request(method, path, json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"], (headers, r.text)
    for role, token in toks.items():
        r = client.request(method, path, json=body, headers=bearer(token))
        if role in allowed:
            assert r.status_code not in (401, 403), (role, r.text)
        else:
            assert r.status_code == 403 and "may not" in r.json()["error"], (role, r.text)


def test_operator_flow_register_topup_list(api):
    world, backend, client, toks = api
    payer = world.device(wire.ROLE_PAYER)
    r = client.post("/v1/devices", json={"cert": payer.cert.hex()}, headers=bearer(toks["provisioning"]))
    assert r.status_code == 200 and r.json()["created"] is True
    r = client.post("/v1/devices", json={"cert": payer.cert.hex()}, headers=bearer(toks["provisioning"]))
    assert r.json()["created"] is False
    r = client.post("/v1/devices", json={"cert": payer.cert[:-1].hex()}, headers=bearer(toks["provisioning"]))
    assert r.status_code == 422 and "certificate" in r.json()["error"]
    r = client.post("/v1/devices", json={"cert": "xyz"}, headers=bearer(toks["provisioning"]))
    assert r.status_code == 400 and "hex" in r.json()["error"]
    path = f"/v1/devices/{payer.device_id.hex()}/vouchers"
    h = {**bearer(toks["treasury"]), "Idempotency-Key": "topup-1"}
    v1 = client.post(path, json={"amount": 5_000}, headers=h).json()
    v2 = client.post(path, json={"amount": 5_000}, headers=h).json()
    assert v1["voucher"] == v2["voucher"] and v2["created"] is False  # a retried request tops up once
    assert client.post(path, json={"amount": 7}, headers=h).status_code == 409
    assert client.post(path, json={"amount": -5}, headers=bearer(toks["treasury"])).status_code == 422
    assert client.post(path, json={"amount": "x"}, headers=bearer(toks["treasury"])).status_code == 422
    v = wire.decode_voucher(bytes.fromhex(v1["voucher"]))
    assert (v.device_id, v.counter, v.amount) == (payer.device_id, 1, 5_000)
    devs = client.get("/v1/devices", headers=bearer(toks["auditor"])).json()
    assert devs[0]["offline_balance"] == 5_000
    bal = client.get("/v1/balances", headers=bearer(toks["auditor"])).json()
    assert bal["balanced"] is True and bal["accounts"]["bank"] == -5_000
    assert "paytoken_devices 1" in client.get("/metrics", headers=bearer(toks["auditor"])).text
    assert client.get("/v1/devices/zz/updates").status_code in (400, 401)


def test_a_device_reads_only_its_own_updates(api):
    world, backend, client, toks = api
    a, b = world.device(wire.ROLE_PAYER), world.device(wire.ROLE_PAYEE)
    for d in (a, b):
        backend.register(d.cert)
    backend.issue_voucher(a.device_id, 1_000)
    path = f"/v1/devices/{a.device_id.hex()}/updates"
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"Authorization": "PaytokenDevice 00"}).status_code == 401
    # b signs a request for a's updates: authenticated as b, not allowed to read a's
    forged = updates_auth(b).replace(b.device_id.hex(), a.device_id.hex(), 1)
    assert client.get(path, headers={"Authorization": forged}).status_code == 401  # b's signature, a's id
    r = client.get(path, headers={"Authorization": updates_auth(b)})
    assert r.status_code == 403 and "own updates" in r.json()["error"]
    # an operator token is no device credential
    assert client.get(path, headers=bearer(toks["auditor"])).status_code == 401
    auth = updates_auth(a)
    r = client.get(path, headers={"Authorization": auth})
    assert r.status_code == 200
    kinds = [bytes.fromhex(u)[0] for u in r.json()["updates"]]
    assert kinds == [wire.T_VOUCHER]
    r = client.get(path, headers={"Authorization": auth})  # the same signed request again
    assert r.status_code == 401 and "replay" in r.json()["error"]
    stale = updates_auth(a, t=NOW - 3600)
    r = client.get(path, headers={"Authorization": stale})
    assert r.status_code == 401 and "time" in r.json()["error"]
    r = client.get(path + "?since=5", headers={"Authorization": updates_auth(a)})  # cursor not the signed one
    assert r.status_code == 401 and "cursor" in r.json()["error"]
    bogus = os.urandom(8).hex()
    r = client.get(f"/v1/devices/{bogus}/updates", headers={"Authorization": updates_auth(a)})
    assert r.status_code == 403


def test_updates_carry_the_revocation_delta_after_the_signed_version(api):
    world, backend, client, _ = api
    a, *revoked = (world.device(wire.ROLE_PAYER) for _ in range(4))
    for d in (a, *revoked):
        backend.register(d.cert)
    for d in revoked:
        backend.revoke(d.device_id, "lost")
    path = f"/v1/devices/{a.device_id.hex()}/updates"

    def deltas(rl_version: int) -> list[revocation.Delta]:
        auth = updates_auth(a, rl_version=rl_version)
        r = client.get(f"{path}?rl_version={rl_version}", headers={"Authorization": auth})
        assert r.status_code == 200, r.text
        raws = [bytes.fromhex(u) for u in r.json()["updates"]]
        return [revocation.decode_delta(u) for u in raws if u[0] == wire.T_REVOCATION]

    (whole,) = deltas(0)
    assert (whole.from_version, whole.ids) == (0, b"".join(sorted(d.device_id for d in revoked)))
    (rest,) = deltas(whole.to_version - 1)  # only the newest one
    assert (rest.from_version, rest.to_version, rest.ids) == (whole.to_version - 1, whole.to_version,
                                                              revoked[-1].device_id)
    assert deltas(whole.to_version) == [] and deltas(whole.to_version + 7) == []  # up to date; ahead: nothing
    r = client.get(path, headers={"Authorization": updates_auth(a, rl_version=3)})  # version not the signed one
    assert r.status_code == 401 and "revocation list version" in r.json()["error"]


def test_uploads_are_open_but_limited(api, tmp_path):
    world, backend, client, _ = api
    payer, payee = world.device(wire.ROLE_PAYER), world.device(wire.ROLE_PAYEE)
    for d in (payer, payee):
        backend.register(d.cert)
    payer.apply(bytes.fromhex(backend.issue_voucher(payer.device_id, 10_000)["voucher"]))
    pay(payer, payee, 1_000)
    r = client.post("/v1/uploads", content=payer.batch())
    assert r.status_code == 200 and r.json()["settled"] == 1
    r = client.post("/v1/uploads", content=payer.batch())
    assert r.status_code == 200 and r.json()["duplicate"] is True
    r = client.post("/v1/uploads", content=b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = client.post("/v1/uploads", content=b"x" * (64 * 1024 + 1))
    assert r.status_code == 413
    r = client.post("/v1/uploads", content=(b"x" * 70_000 for _ in range(1)))  # streamed, no length given
    assert r.status_code == 413
    # the rate limit counts uploads per address per minute, in the database (shared by all workers)
    backend.upload_rate = 5  # three uploads were counted this minute (the oversized ones were refused before)
    replies = [client.post("/v1/uploads", content=payer.batch()) for _ in range(5)]
    assert [r.status_code for r in replies] == [200, 200, 429, 429, 429]
    assert "rate limit" in replies[-1].json()["error"]
    assert backend.balances()["balanced"]


def test_openapi_and_health(api):
    _, _, client, _ = api
    doc = client.get("/openapi.json").json()
    assert {"/v1/uploads", "/v1/devices", "/v1/devices/{device_id}/updates", "/health"} <= set(doc["paths"])
    assert client.get("/health").json()["status"] == "ok"


def test_public_keys_for_provisioning(api):
    # what a provisioning station installs on a device: no credential needed, nothing secret in it
    world, backend, client, _ = api
    from cryptography.hazmat.primitives.asymmetric import x25519

    from paytoken_host.backend.keys import noise_static

    got = client.get("/v1/keys").json()
    assert got == {"issuer": backend.issuer_pub.hex(), "backend": backend.backend_pub.hex(),
                   "backend_kx": backend.noise_pub.hex()}
    priv, pub = noise_static(backend.key)
    assert x25519.X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes_raw() == pub == backend.noise_pub
    assert noise_static(backend.key) == (priv, pub)  # derived the same every time: the devices keep it for years
    assert pub not in (backend.backend_pub[1:33], backend.backend_pub[33:])
