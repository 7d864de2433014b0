"""Configuration, from the environment (so every uvicorn worker and host reads the same) or the CLI's flags."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    db_url: str = "sqlite:///paytoken.db"
    backend_key: str = "backend.key"  # PEM, encrypted with PAYTOKEN_KEY_PASSPHRASE
    expiry_days: float = 30.0  # a sent-unconfirmed payment is refunded this long after the payer reported it
    max_upload_bytes: int = 4 * 1024 * 1024
    upload_rate: int = 6000  # uploads per minute from one client address
    bank_url: str | None = None  # outbox webhook target; no delivery without it
    bank_secret: str | None = None  # HMAC key for the webhook signature
    background_interval: float = 10.0  # seconds between expiry and outbox runs in each worker (0: off)

    @classmethod
    def from_env(cls) -> Config:
        e = os.environ
        return cls(
            db_url=e.get("PAYTOKEN_DB", cls.db_url),
            backend_key=e.get("PAYTOKEN_BACKEND_KEY", cls.backend_key),
            expiry_days=float(e.get("PAYTOKEN_EXPIRY_DAYS", cls.expiry_days)),
            max_upload_bytes=int(e.get("PAYTOKEN_MAX_UPLOAD_BYTES", cls.max_upload_bytes)),
            upload_rate=int(e.get("PAYTOKEN_UPLOAD_RATE", cls.upload_rate)),
            bank_url=e.get("PAYTOKEN_BANK_URL") or None,
            bank_secret=e.get("PAYTOKEN_BANK_SECRET") or None,
            background_interval=float(e.get("PAYTOKEN_BACKGROUND_INTERVAL", cls.background_interval)),
        )

    def to_env(self) -> dict[str, str]:
        env = {"PAYTOKEN_DB": self.db_url, "PAYTOKEN_BACKEND_KEY": self.backend_key,
               "PAYTOKEN_EXPIRY_DAYS": str(self.expiry_days), "PAYTOKEN_MAX_UPLOAD_BYTES": str(self.max_upload_bytes),
               "PAYTOKEN_UPLOAD_RATE": str(self.upload_rate),
               "PAYTOKEN_BACKGROUND_INTERVAL": str(self.background_interval)}
        if self.bank_url:
            env["PAYTOKEN_BANK_URL"] = self.bank_url
        if self.bank_secret:
            env["PAYTOKEN_BANK_SECRET"] = self.bank_secret
        return env
