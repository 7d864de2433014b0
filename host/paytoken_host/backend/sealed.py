"""The sealed sync exchange (docs/protocol.md section 10, "Sealed exchange"): one Noise NK handshake per HTTP request,
the backend as responder with its X25519 static key (keys.noise_static). Message 1 carries the device's request
(paytoken.syncwire: a signed updates request, an upload batch, or both), message 2 the answer. Everything the device
learns is inside message 2, so a relay sees only sizes and timing; the only answer in clear is the refusal of a
message 1 that does not decrypt (there is no session to seal an answer in).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from noise.connection import Keypair, NoiseConnection

from paytoken import syncwire, wire
from paytoken_host.backend import auth, db
from paytoken_host.backend import formats as F
from paytoken_host.backend.verify import Reject

NOISE_PROTOCOL = b"Noise_NK_25519_AESGCM_SHA256"
MAX_MESSAGE = 65535  # a Noise message
STATUSES = 32  # statuses in one answer (about 3 KB: the device holds the whole answer in RAM)
VOUCHERS = 8  # vouchers in one answer
# Bytes of updates in one answer beyond the acknowledgement (revocation delta, vouchers, statuses): message 2 must fit
# the 4 KB a USB frame or a BLE sync message carries, with its ephemeral key, tag, header and up to 255 bytes of error
# text.
UPDATES_BUDGET = 3072


def exchange(be, msg1: bytes) -> bytes:
    """Message 2 for message 1; Reject 400 (in clear) when message 1 is not a handshake to this backend's key."""
    if len(msg1) > MAX_MESSAGE:
        raise Reject(413, f"sync: message 1 larger than {MAX_MESSAGE} bytes")
    if not be.noise_priv:
        raise Reject(503, "backend has no key")
    noise = NoiseConnection.from_name(NOISE_PROTOCOL)
    noise.set_as_responder()
    noise.set_prologue(syncwire.PROLOGUE)
    noise.set_keypair_from_private_bytes(Keypair.STATIC, be.noise_priv)
    noise.start_handshake()
    try:
        plain = bytes(noise.read_message(msg1))
    except Exception:  # noiseprotocol raises its own exceptions and ValueError/InvalidTag from cryptography
        raise Reject(400, "sync: message 1 is not a Noise NK handshake to this backend's key") from None
    return bytes(noise.write_message(answer(be, plain, msg1[:32])))


def answer(be, plain: bytes, ephemeral: bytes) -> bytes:
    """The answer's plaintext for a request's plaintext: upload first, then the updates (which then include the
    acknowledgement of that upload and the statuses it set)."""
    try:
        ureq, head, records = syncwire.decode_request(plain)
    except wire.WireError as e:
        return syncwire.answer(400, 0, 400, 0, False, f"malformed request: {e}", [])
    up = synced = 0
    error = ""
    ack: list[bytes] = []
    if head is not None:
        try:
            status, result = be.upload_batch(F.sealed_batch(head, records))
        except F.BatchError as e:
            up, error = 400, str(e)
        except Reject as r:
            up, error = r.status, r.reason
        else:
            up, synced = 200, result.get("synced_seq", 0)
            ack = [bytes.fromhex(result["ack"])] if "ack" in result else []
            if status != 200:
                error = "; ".join(result.get("forks", ()))  # stored, and a fork found: the device is told why
    ust = cursor = 0
    more = False
    wake = bytes(syncwire.WAKE_LEN)
    updates: list[bytes] = []
    if ureq is not None:
        try:
            req = auth.sealed_request(ureq, ephemeral, be.cert_of)
            now = be.now()
            with db.read_tx(be.engine) as conn:
                updates, cursor, more = be.device_updates(conn, req.device_id, req.since, now, STATUSES, VOUCHERS,
                                                          UPDATES_BUDGET, req.rl_version)
            ust = 200
            wake = wake_token(be, req.device_id)
        except Reject as r:
            ust, error = r.status, error or r.reason
    else:
        updates = ack  # an upload alone: its acknowledgement
    return syncwire.answer(up, synced, ust, cursor, more, error, updates, wake)


# ---- wake-up tokens (GET /v1/wake/{token}) ----
# A device's token is its id and 8 zero bytes, one AES block under a key derived from the backend's X25519 key: only
# the backend can make one or read the device id in it, one device's is unlinkable to another's, and a random string
# is not a token (its last 8 bytes would have to decrypt to zeros).
WAKE_INFO = b"paytoken backend wake token v1"


def wake_key(noise_priv: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 16, salt=None, info=WAKE_INFO).derive(noise_priv)


def _wake_cipher(be) -> Cipher:
    return Cipher(algorithms.AES(be.wake_key), modes.ECB())


def wake_token(be, device_id: bytes) -> bytes:
    enc = _wake_cipher(be).encryptor()
    return enc.update(device_id + bytes(8)) + enc.finalize()


def wake_device(be, token: bytes) -> bytes:
    """The device id in a wake token; Reject 404 for anything else."""
    if len(token) != syncwire.WAKE_LEN or not be.wake_key:
        raise Reject(404, "not a wake token of this backend")
    dec = _wake_cipher(be).decryptor()
    plain = dec.update(token) + dec.finalize()
    if plain[8:] != bytes(8):
        raise Reject(404, "not a wake token of this backend")
    return plain[:8]
