# paytoken's GATT service, advertising payload and link control frames (docs/protocol.md section 9).
# Pure logic with no `bluetooth` import: the payee (peripheral), the payer (central) and CPython host tools
# share it. UUIDs are kept as strings here; the roles turn them into bluetooth.UUID objects.
import hashlib
from binascii import unhexlify

try:
    from micropython import const
except ImportError:  # CPython host tools

    def const(x):
        return x


# The service and its two characteristics (random 128-bit UUIDs, one base, the first group counts up).
SERVICE_UUID = "1cb60001-cfd4-4071-8810-8df10cddb976"
WRITE_UUID = "1cb60002-cfd4-4071-8810-8df10cddb976"  # payer -> payee frames: write with response
NOTIFY_UUID = "1cb60003-cfd4-4071-8810-8df10cddb976"  # payee -> payer frames: notify (CCCD 0x2902)
CCCD_UUID = const(0x2902)  # Client Characteristic Configuration; NimBLE adds it to a notify characteristic
CCCD_NOTIFY = b"\x01\x00"  # CCCD value that enables notifications

PROP_WRITE = const(0x08)  # characteristic properties as discovered (GATT Characteristic Properties bits)
PROP_NOTIFY = const(0x10)

DEFAULT_MTU = const(23)  # ATT_MTU before the exchange
# The payment session's messages are at most 228 bytes (docs/protocol.md section 2: certificates have fixed
# sizes); each side's reassembly buffer holds SESSION_MESSAGE, not the framing's MAX_MESSAGE: 3.5 KB less heap.
SESSION_MESSAGE = const(512)
PREFERRED_MTU = const(247)  # both sides' config(mtu=): frames of 244 bytes, one LE data PDU each (DLE 251)
ADV_INTERVAL_US = const(100000)

# Advertising: 31 bytes, all in the advertising PDU so a passive scan sees them:
#   02 01 06                       flags: LE General Discoverable, BR/EDR not supported
#   11 07 <16 bytes>               complete list of 128-bit service UUIDs: SERVICE_UUID, little-endian
#   09 FF FF FF 01 <5 bytes>       manufacturer data: company 0xFFFF, format 1, the nonce tag
# The scan response holds the name: <n+1> 09 <name>, or 08 (shortened) when cut to 29 bytes.
_AD_FLAGS = const(0x01)
_AD_UUID128_INCOMPLETE = const(0x06)
_AD_UUID128_COMPLETE = const(0x07)
_AD_NAME_SHORT = const(0x08)
_AD_NAME_COMPLETE = const(0x09)
_AD_MANUFACTURER = const(0xFF)
_FLAGS_LE_GENERAL = const(0x06)
COMPANY_ID = const(0xFFFF)  # Bluetooth SIG: "no company" (tests, prototypes); a product uses its own id
ADV_FORMAT = const(1)
TAG_LEN = const(5)
_LEGACY_ADV_MAX = const(31)
_TAG_DOMAIN = b"paytoken/adv"

# Link control frames: b0 has the framing's reserved bit 6 set, so they can never be taken for data frames.
# Exactly two bytes, 0x40 then the code; valid only before the session opens (see protocol.md section 9).
_CONTROL = const(0x40)
OPEN = const(1)  # payer -> payee: subscribed, please serve this connection
READY = const(2)  # payee -> payer: served; messages may flow
BUSY = const(3)  # payee -> payer: serving another payer; the payee disconnects
OPEN_FRAME = b"\x40\x01"
READY_FRAME = b"\x40\x02"
BUSY_FRAME = b"\x40\x03"


def uuid_le(text):
    """The 16 bytes of a 128-bit UUID string in over-the-air (little-endian) order."""
    b = unhexlify(text.replace("-", ""))
    if len(b) != 16:
        raise ValueError("not a 128-bit UUID")
    return bytes(reversed(b))


SERVICE_UUID_LE = uuid_le(SERVICE_UUID)


def nonce_tag(nonce):
    """The 5-byte advertising tag of a QR nonce: SHA-256("paytoken/adv" || nonce), first 5 bytes."""
    if len(nonce) != 8:
        raise ValueError("nonce must be 8 bytes")
    return hashlib.sha256(_TAG_DOMAIN + bytes(nonce)).digest()[:TAG_LEN]


def adv_payload(nonce):
    """The 31-byte advertising data announcing the payee of the QR with this nonce."""
    b = bytearray(_LEGACY_ADV_MAX)
    b[0:3] = b"\x02\x01\x06"
    b[3] = 17
    b[4] = _AD_UUID128_COMPLETE
    b[5:21] = SERVICE_UUID_LE
    b[21] = 4 + TAG_LEN
    b[22] = _AD_MANUFACTURER
    b[23] = COMPANY_ID & 0xFF
    b[24] = COMPANY_ID >> 8
    b[25] = ADV_FORMAT
    b[26:31] = nonce_tag(nonce)
    return bytes(b)


def scan_response(name):
    """Scan response data: the name, complete, or shortened to the 29 bytes that fit."""
    n = name.encode() if isinstance(name, str) else bytes(name)
    kind = _AD_NAME_COMPLETE
    if len(n) > _LEGACY_ADV_MAX - 2:
        n = n[: _LEGACY_ADV_MAX - 2]
        kind = _AD_NAME_SHORT
    return bytes((len(n) + 1, kind)) + n


def ad_find(adv, ad_type, start=0):
    """Offset of the value of the first AD structure of ad_type at or after offset start, or -1.

    Its length is adv[offset - 2] - 1. -1 as well when the data is malformed (a length running past the end).
    Allocates nothing, so a scan-result IRQ handler may call it on the memoryview it is given.
    """
    i = start
    n = len(adv)
    while i < n:
        ln = adv[i]
        if ln == 0:  # padding: nothing follows
            return -1
        if i + 1 + ln > n:
            return -1
        if adv[i + 1] == ad_type:
            return i + 2
        i += 1 + ln
    return -1


def _has_service(adv):
    for kind in (_AD_UUID128_COMPLETE, _AD_UUID128_INCOMPLETE):
        pos = ad_find(adv, kind)
        while pos >= 0:
            end = pos + adv[pos - 2] - 1
            for j in range(pos, end - 15, 16):
                k = 0
                while k < 16 and adv[j + k] == SERVICE_UUID_LE[k]:
                    k += 1
                if k == 16:
                    return True
            pos = ad_find(adv, kind, end)
    return False


def _tag_at(adv):
    # Offset of the nonce tag in our manufacturer data, or -1.
    pos = ad_find(adv, _AD_MANUFACTURER)
    while pos >= 0:
        ln = adv[pos - 2] - 1
        if (
            ln == 3 + TAG_LEN
            and adv[pos] == COMPANY_ID & 0xFF
            and adv[pos + 1] == COMPANY_ID >> 8
            and adv[pos + 2] == ADV_FORMAT
        ):
            return pos + 3
        pos = ad_find(adv, _AD_MANUFACTURER, pos + ln)
    return -1


def adv_matches(adv, tag):
    """True if adv announces the paytoken service with this nonce tag (see nonce_tag). No allocation."""
    t = _tag_at(adv)
    if t < 0:
        return False
    for k in range(TAG_LEN):
        if adv[t + k] != tag[k]:
            return False
    return _has_service(adv)


def parse_adv(adv):
    """(offers the service, nonce tag or None, name or None) of advertising or scan response data."""
    t = _tag_at(adv)
    tag = bytes(adv[t : t + TAG_LEN]) if t >= 0 else None
    name = None
    for kind in (_AD_NAME_COMPLETE, _AD_NAME_SHORT):
        pos = ad_find(adv, kind)
        if pos >= 0:
            try:
                name = bytes(adv[pos : pos + adv[pos - 2] - 1]).decode()
            except ValueError:  # UnicodeError: not UTF-8
                pass
            break
    return _has_service(adv), tag, name


def control_code(frame):
    """The code of a link control frame (0x40, code), -1 for a frame without the control bit.

    A frame with the control bit that is not exactly two bytes gives 0 (no valid code).
    """
    if len(frame) == 0 or not frame[0] & _CONTROL:
        return -1
    if len(frame) != 2 or frame[0] != _CONTROL:
        return 0
    return frame[1]
