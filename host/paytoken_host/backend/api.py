"""The HTTP API (FastAPI; OpenAPI at /openapi.json). Routers: health and metrics, devices (operators),
vouchers (treasury), uploads (open to any relay, size- and rate-limited), device updates (device-signed).
Every refusal is a JSON body {"error": reason} with a 4xx status."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from paytoken_host.backend import auth, db, outbox, sealed
from paytoken_host.backend.config import Config
from paytoken_host.backend.keys import load_key_file, passphrase_from_env
from paytoken_host.backend.service import Backend
from paytoken_host.backend.verify import Reject

SEALED = "application/octet-stream"
WAKE_MAX = 60.0  # seconds a wake-up long-poll may be held
WAKE_POLL = 0.25  # seconds between looks at the database while one is held (every worker sees every upload)


class RegisterIn(BaseModel):
    cert: str = Field(description="the issuer-signed device certificate, hex")


class RevokeIn(BaseModel):
    reason: str = Field(min_length=1, max_length=500)


class VoucherIn(BaseModel):
    amount: int = Field(gt=0, lt=2**32, description="minor units")


def _hex_id(value: str, n: int, what: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise Reject(400, f"{what}: not hex") from None
    if len(raw) != n:
        raise Reject(400, f"{what}: expected {n} bytes")
    return raw


def create_app(backend: Backend | None = None, config: Config | None = None) -> FastAPI:
    config = config or Config.from_env()
    if backend is None:
        engine = db.make_engine(config.db_url)
        key = load_key_file(config.backend_key, passphrase_from_env())
        delay = float(os.environ.get("PAYTOKEN_TEST_COMMIT_DELAY", "0"))  # tests: a crash window before commit
        backend = Backend(engine, key, expiry=int(config.expiry_days * 86400), upload_rate=config.upload_rate,
                          commit_hook=(lambda: time.sleep(delay)) if delay else None)
    be = backend

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> Iterator[None]:
        stop = threading.Event()
        worker = None
        if config.background_interval > 0:
            worker = threading.Thread(target=_background, args=(be, config, stop), daemon=True)
            worker.start()
        yield
        stop.set()
        if worker:
            worker.join(timeout=5)

    app = FastAPI(title="paytoken settlement backend", version="1", lifespan=lifespan)
    app.state.backend = be

    @app.exception_handler(Reject)
    async def _reject(_request: Request, exc: Reject) -> JSONResponse:
        return JSONResponse({"error": exc.reason}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"invalid request: {msgs}"}, status_code=422)

    def operator(*roles: str):
        def dep(authorization: str | None = Header(default=None)) -> str:
            with db.read_tx(be.engine) as conn:
                return auth.operator(conn, authorization, roles)
        return Depends(dep)

    health = APIRouter(tags=["health"])

    @health.get("/health")
    def get_health() -> dict:
        with db.read_tx(be.engine) as conn:
            conn.execute(text("SELECT 1"))
        return {"status": "ok", "pid": os.getpid()}

    @health.get("/metrics", response_class=PlainTextResponse, dependencies=[operator("auditor")])
    def get_metrics() -> str:
        return be.metrics()

    @health.get("/v1/keys")
    def get_keys() -> dict:
        return be.keys()

    devices = APIRouter(prefix="/v1/devices", tags=["devices"])

    @devices.post("", dependencies=[operator("provisioning")])
    def register(body: RegisterIn) -> dict:
        try:
            raw = bytes.fromhex(body.cert)
        except ValueError:
            raise Reject(400, "cert: not hex") from None
        return be.register(raw)

    @devices.get("", dependencies=[operator("auditor", "provisioning", "treasury")])
    def list_devices() -> list[dict]:
        return be.devices()

    @devices.post("/{device_id}/revoke", dependencies=[operator("provisioning")])
    def revoke(device_id: str, body: RevokeIn) -> dict:
        return be.revoke(_hex_id(device_id, 8, "device id"), body.reason)

    @devices.post("/{device_id}/vouchers", dependencies=[operator("treasury")])
    def voucher(device_id: str, body: VoucherIn, idempotency_key: str | None = Header(default=None)) -> dict:
        return be.issue_voucher(_hex_id(device_id, 8, "device id"), body.amount, idempotency_key)

    @devices.get("/{device_id}/updates")
    def updates(device_id: str, since: int = Query(default=0, ge=0, lt=2**32),
                rl_version: int = Query(default=0, ge=0, lt=2**32),
                authorization: str | None = Header(default=None)) -> dict:
        return be.updates(authorization, _hex_id(device_id, 8, "device id"), since, rl_version)

    uploads = APIRouter(prefix="/v1", tags=["uploads"])

    async def bounded_body(request: Request, limit: int, what: str) -> bytes:
        """The request's body, refused with 413 beyond `limit` bytes (before reading it all), rate-counted."""
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise Reject(413, f"{what} larger than {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Reject(413, f"{what} larger than {limit} bytes")
            chunks.append(chunk)
        client = request.client.host if request.client else "unknown"
        await run_in_threadpool(be.check_rate, client)
        return b"".join(chunks)

    @uploads.post("/uploads")
    async def upload(request: Request) -> JSONResponse:
        body = await bounded_body(request, config.max_upload_bytes, "upload")
        status, result = await run_in_threadpool(be.upload, body)
        return JSONResponse(result, status_code=status)

    @uploads.post("/sync", response_class=Response, responses={200: {"content": {SEALED: {}}}})
    async def sync(request: Request) -> Response:
        """A sealed sync exchange: the body is the device's Noise message 1, the answer its message 2
        (application/octet-stream both ways; docs/protocol.md section 10). 400 in clear when message 1 is not a
        handshake to this backend's key; every other outcome is inside message 2."""
        body = await bounded_body(request, sealed.MAX_MESSAGE, "sync message")
        return Response(await run_in_threadpool(be.sync, body), media_type=SEALED)

    @uploads.get("/wake/{token}")
    async def wake(token: str, since: int = Query(default=0, ge=0, lt=2**32),
                   wait: float = Query(default=25, ge=0, le=WAKE_MAX)) -> dict:
        """Long-poll for a relay that stays with a device: held until the device has news after status cursor
        `since` or `wait` seconds pass. {"wake": true, "cursor": n} means: run a sealed exchange now. The token is
        the one the device's last sealed answer gave it (docs/protocol.md section 10, "Wake-up")."""
        device_id = sealed.wake_device(be, _hex_id(token, 16, "wake token"))
        deadline = time.monotonic() + wait
        while True:
            cursor = await run_in_threadpool(be.news_since, device_id, since)
            if cursor is not None:
                return {"wake": True, "cursor": cursor}
            left = deadline - time.monotonic()
            if left <= 0:
                return {"wake": False, "cursor": since}
            await asyncio.sleep(min(WAKE_POLL, left))

    ops = APIRouter(prefix="/v1", tags=["operators"])

    @ops.get("/balances", dependencies=[operator("auditor", "treasury")])
    def balances() -> dict:
        return be.balances()

    @ops.get("/alerts", dependencies=[operator("auditor")])
    def alerts(limit: int = Query(default=200, ge=1, le=10000)) -> list[dict]:
        return be.alerts(limit)

    @ops.get("/payments/{txid}", dependencies=[operator("auditor", "treasury")])
    def payment(txid: str) -> dict:
        return be.payment(_hex_id(txid, 16, "txid"))

    @ops.post("/expire", dependencies=[operator("treasury")])
    def expire() -> dict:
        return {"refunded": be.settlement.expire()}

    for r in (health, devices, uploads, ops):
        app.include_router(r)
    return app


def _background(be: Backend, config: Config, stop: threading.Event) -> None:
    """Per worker: refunds expired payments and delivers the outbox. Safe to run in every worker at once."""
    while not stop.wait(config.background_interval):
        try:
            be.settlement.expire()
            if config.bank_url and config.bank_secret:
                outbox.deliver_due(be.engine, config.bank_url, config.bank_secret.encode())
        except Exception as e:  # keep the worker alive; the next round retries
            print(f"paytoken-backend background: {type(e).__name__}: {e}", flush=True)


def app_from_env() -> FastAPI:
    """uvicorn factory for `paytoken-backend serve` (each worker process builds its app from the environment)."""
    app = create_app()
    tune_collector()
    return app


def tune_collector() -> None:
    """The cycle collector as a worker runs it, set once the worker's modules and app are built."""
    # An upload allocates tens of container objects per record and frees them itself (no cycles): at the default
    # threshold (700 net allocations) the cycle collector ran some ten times per upload, about 5 us of CPU per
    # payment. The startup's objects (modules, app) are frozen out of every collection; the young generation is
    # collected every 20,000 net allocations, which still bounds what garbage cycles can hold.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
