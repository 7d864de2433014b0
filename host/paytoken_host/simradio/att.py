"""ATT (Bluetooth Core Vol 3 Part F) PDU constants and the few encoders/decoders the simulated radio needs.

The broker carries ATT PDUs unchanged between devices; only the devices (the MicroPython `bluetooth` module and
`client.RadioClient`) build and parse them. The broker looks at the opcode of exchanged MTU PDUs to report a link's
ATT MTU, and at opcodes and handles for its `trace` and `drop_at` (docs/simulator.md), nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

DEFAULT_MTU = 23
MAX_MTU = 527  # NimBLE BLE_ATT_MTU_MAX

# Opcodes
ERROR_RSP = 0x01
MTU_REQ = 0x02
MTU_RSP = 0x03
FIND_INFO_REQ = 0x04
FIND_INFO_RSP = 0x05
FIND_TYPE_VALUE_REQ = 0x06
FIND_TYPE_VALUE_RSP = 0x07
READ_TYPE_REQ = 0x08
READ_TYPE_RSP = 0x09
READ_REQ = 0x0A
READ_RSP = 0x0B
READ_BLOB_REQ = 0x0C
READ_BLOB_RSP = 0x0D
READ_GROUP_TYPE_REQ = 0x10
READ_GROUP_TYPE_RSP = 0x11
WRITE_REQ = 0x12
WRITE_RSP = 0x13
NOTIFY = 0x1B
INDICATE = 0x1D
CONFIRM = 0x1E
WRITE_CMD = 0x52

REQUESTS = {MTU_REQ, FIND_INFO_REQ, FIND_TYPE_VALUE_REQ, READ_TYPE_REQ, READ_REQ, READ_BLOB_REQ,
            READ_GROUP_TYPE_REQ, WRITE_REQ}
HANDLE_PDUS = {READ_REQ, READ_BLOB_REQ, WRITE_REQ, WRITE_CMD, NOTIFY, INDICATE}  # opcode, then a handle
RESPONSES = {ERROR_RSP, MTU_RSP, FIND_INFO_RSP, FIND_TYPE_VALUE_RSP, READ_TYPE_RSP, READ_RSP, READ_BLOB_RSP,
             READ_GROUP_TYPE_RSP, WRITE_RSP}

# Error codes (in ERROR_RSP)
ERR_INVALID_HANDLE = 0x01
ERR_READ_NOT_PERMITTED = 0x02
ERR_WRITE_NOT_PERMITTED = 0x03
ERR_REQ_NOT_SUPPORTED = 0x06
ERR_INVALID_OFFSET = 0x07
ERR_ATTR_NOT_FOUND = 0x0A
ERR_INVALID_ATTR_VALUE_LEN = 0x0D
ERR_UNSUPPORTED_GROUP_TYPE = 0x10

# Attribute types
PRIMARY_SERVICE = 0x2800
CHARACTERISTIC = 0x2803
CCCD = 0x2902


class AttError(Exception):
    """An ATT error response: `code` is the ATT error code, `handle` the attribute it names."""

    def __init__(self, request: int, handle: int, code: int):
        super().__init__(f"ATT error 0x{code:02x} on handle {handle} (request 0x{request:02x})")
        self.request = request
        self.handle = handle
        self.code = code


@dataclass(frozen=True)
class Uuid:
    """A 16- or 128-bit UUID as carried in ATT: little-endian bytes (2 or 16)."""

    le: bytes

    @classmethod
    def parse(cls, value: int | str | bytes) -> Uuid:
        if isinstance(value, int):
            if not 0 <= value <= 0xFFFF:
                raise ValueError(f"16-bit UUID out of range: {value:#x}")
            return cls(value.to_bytes(2, "little"))
        if isinstance(value, bytes):
            if len(value) not in (2, 16):
                raise ValueError("a UUID is 2 or 16 little-endian bytes")
            return cls(value)
        digits = value.replace("-", "")
        if len(digits) != 32:
            raise ValueError(f"not a 128-bit UUID: {value!r}")
        return cls(bytes.fromhex(digits)[::-1])

    def __str__(self) -> str:
        if len(self.le) == 2:
            return f"0x{int.from_bytes(self.le, 'little'):04x}"
        h = self.le[::-1].hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def u16(value: int) -> bytes:
    return struct.pack("<H", value)


def error_rsp(request: int, handle: int, code: int) -> bytes:
    return struct.pack("<BBHB", ERROR_RSP, request, handle, code)


def parse_error(pdu: bytes) -> AttError:
    if len(pdu) != 5:
        raise ValueError(f"malformed ATT error response: {pdu.hex()}")
    _, request, handle, code = struct.unpack("<BBHB", pdu)
    return AttError(request, handle, code)


def entries(body: bytes, size: int) -> list[bytes]:
    """Split the list part of a discovery response into entries of `size` bytes."""
    if size <= 0 or len(body) % size:
        raise ValueError(f"malformed ATT list: {len(body)} bytes in entries of {size}")
    return [body[i : i + size] for i in range(0, len(body), size)]
