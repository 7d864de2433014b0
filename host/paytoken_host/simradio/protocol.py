"""The broker's wire protocol: JSON objects, one per line, over loopback TCP (docs/simulator.md, "Radio").

Every message is a JSON object with a string field "t" (its type). Binary data travels as lowercase hex strings;
a Bluetooth address is 12 hex digits, most significant byte first (as printed on a device and as MicroPython's
`addr` bytes). This module holds the encoder, the decoder and field validation shared by broker and client.
"""

from __future__ import annotations

import json
from typing import Any

VERSION = 1
MAX_LINE = 1 << 16  # bytes; a longer line is a protocol error

# HCI disconnect reasons reported in "disc" messages (Bluetooth Core Vol 1 Part F)
REASON_CONN_TIMEOUT = 0x08  # supervision timeout: the radio link was lost
REASON_REMOTE_USER = 0x13  # the peer called gap_disconnect
REASON_POWER_OFF = 0x15  # the peer switched its radio off (active(False))
REASON_LOCAL_HOST = 0x16  # this side called gap_disconnect

# NimBLE status codes reported in "conn_fail" messages
STATUS_CANCELLED = 9  # BLE_HS_EAPP: gap_connect(None) cancelled the attempt
STATUS_TIMEOUT = 13  # BLE_HS_ETIMEOUT: no connectable advertiser seen within the duration


class ProtocolError(ValueError):
    """A message that breaks the protocol; the text says what and how."""


def encode(msg: dict[str, Any]) -> bytes:
    return (json.dumps(msg, separators=(",", ":")) + "\n").encode()


def decode(line: bytes) -> dict[str, Any]:
    """One received line (without its newline) as a message, or ProtocolError."""
    if len(line) > MAX_LINE:
        raise ProtocolError(f"line longer than {MAX_LINE} bytes")
    try:
        msg = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"not JSON ({exc}); every line must be one JSON object") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise ProtocolError('a message must be a JSON object with a string field "t"')
    return msg


def get_int(msg: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int:
    value = msg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(f'{msg.get("t")}: field "{key}" must be an integer in {lo}..{hi}, got {value!r}')
    return value


def get_float(msg: dict[str, Any], key: str, lo: float, hi: float) -> float:
    value = msg.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ProtocolError(f'{msg.get("t")}: field "{key}" must be a number in {lo}..{hi}, got {value!r}')
    return float(value)


def get_bool(msg: dict[str, Any], key: str, default: bool) -> bool:
    value = msg.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f'{msg.get("t")}: field "{key}" must be true or false, got {value!r}')
    return value


def get_hex(msg: dict[str, Any], key: str, max_bytes: int, default: str | None = None) -> bytes:
    value = msg.get(key, default)
    if not isinstance(value, str):
        raise ProtocolError(f'{msg.get("t")}: field "{key}" must be a hex string, got {value!r}')
    try:
        data = bytes.fromhex(value)
    except ValueError:
        raise ProtocolError(f'{msg.get("t")}: field "{key}" is not hex: {value[:40]!r}') from None
    if len(data) > max_bytes:
        raise ProtocolError(f'{msg.get("t")}: field "{key}" longer than {max_bytes} bytes')
    return data


def get_addr(msg: dict[str, Any], key: str) -> bytes:
    data = get_hex(msg, key, 6)
    if len(data) != 6:
        raise ProtocolError(f'{msg.get("t")}: field "{key}" must be a 6-byte address (12 hex digits)')
    return data


def get_str(msg: dict[str, Any], key: str, max_len: int, default: str = "") -> str:
    value = msg.get(key, default)
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(f'{msg.get("t")}: field "{key}" must be a string of at most {max_len} characters')
    return value


def parse_address(text: str) -> bytes:
    """ "aa:bb:cc:dd:ee:ff" or "aabbccddeeff" as 6 bytes, most significant first."""
    digits = text.replace(":", "").replace("-", "")
    try:
        addr = bytes.fromhex(digits)
    except ValueError:
        raise ProtocolError(f"not a Bluetooth address: {text!r}") from None
    if len(addr) != 6:
        raise ProtocolError(f"not a Bluetooth address: {text!r}")
    return addr


def format_address(addr: bytes) -> str:
    return ":".join(f"{b:02x}" for b in addr)
