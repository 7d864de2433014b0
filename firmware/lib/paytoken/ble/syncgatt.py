# The BLE sync service (docs/protocol.md section 9, "Sync service"): UUIDs, advertising, and the requests a relay
# (a phone or PC, the GATT client) sends to a device in sync mode and the device's responses. Pure logic with no
# `bluetooth` import: the device's sync mode (paytoken.app.syncble) and the host's relay (paytoken_host.sync_ble)
# share it. Loaded only in sync mode, never on the payment path.
#
# The link is the payment service's (section 9): the relay subscribes, writes OPEN, gets READY, then messages cut
# into frames by paytoken.framing cross as writes (relay -> device) and notifications (device -> relay). One
# request, one response, in turn:
#   PULL                 -> PULLED + the sync client's next sealed message 1 (nothing after the byte: no more)
#   PUSH + message 2     -> PUSHED + u16 updates applied
#   STATUS               -> STATUS_R + the status summary (paytoken.syncwire.status_summary, as over USB)
# Anything refused     -> ERROR + u8 final (1: the backend refused, the device stops; 0: ask again) + reason ASCII
import struct

from paytoken import syncwire
from paytoken.ble.gatt import COMPANY_ID, uuid_le

try:
    from micropython import const
except ImportError:  # CPython host tools

    def const(x):
        return x


SERVICE_UUID = "293f0001-69ef-4053-bda5-eb348e1ef065"
WRITE_UUID = "293f0002-69ef-4053-bda5-eb348e1ef065"  # relay -> device frames: write with response
NOTIFY_UUID = "293f0003-69ef-4053-bda5-eb348e1ef065"  # device -> relay frames: notify
UUIDS = (SERVICE_UUID, WRITE_UUID, NOTIFY_UUID)

PULL = const(0x01)
PUSH = const(0x02)
STATUS = const(0x03)
PULLED = const(0x81)
PUSHED = const(0x82)
STATUS_R = const(0x83)
ERROR = const(0xFF)
SYNC_FORMAT = const(2)  # manufacturer data format byte of a device in sync mode (the payee's nonce tag is 1)


class SyncGattError(ValueError):
    pass


def adv_payload():
    """Advertising data of a device in sync mode: flags, the sync service's UUID, manufacturer data (format 2)."""
    return b"\x02\x01\x06\x11\x07" + uuid_le(SERVICE_UUID) + bytes((4, 0xFF, COMPANY_ID & 0xFF, COMPANY_ID >> 8,
                                                                    SYNC_FORMAT))


def pushed(applied):
    return struct.pack(">BH", PUSHED, min(applied, 0xFFFF))


def error(final, reason):
    return bytes((ERROR, 1 if final else 0)) + reason.encode()[:200]


def status(summary):
    # summary: the device's status summary (syncwire.status_summary; sync_client.summary builds it)
    return bytes((STATUS_R,)) + summary


# --- the relay's side: responses decoded (SyncGattError for anything malformed) ---


def decode(resp, expect):
    """The body of a response to a request (PULLED, PUSHED, STATUS_R expected); ERROR -> (None, final, reason)."""
    if not resp:
        raise SyncGattError("empty response")
    if resp[0] == ERROR:
        if len(resp) < 2:
            raise SyncGattError("error response: too short")
        return None, resp[1] == 1, bytes(resp[2:]).decode("utf-8", "replace")
    if resp[0] != expect:
        raise SyncGattError("response 0x%02x to a request expecting 0x%02x" % (resp[0], expect))
    return bytes(resp[1:]), False, ""


def decode_pushed(body):
    if len(body) != 2:
        raise SyncGattError("push result: not 2 bytes")
    return struct.unpack(">H", body)[0]


def decode_status(body):
    # (hint or None, [(role, txid, amount, status)])
    try:
        return syncwire.decode_status_summary(body)
    except syncwire.WireError as e:
        raise SyncGattError(str(e))
