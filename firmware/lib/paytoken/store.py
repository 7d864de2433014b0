# The device store: what provisioning gives a device, in files under <root>/store/ on the device filesystem
# (docs/architecture.md, "Device store"). The ledger lives beside it in <root>/ledger/.
#
#   identity.key  32 bytes   P-256 private key (big-endian scalar): signs payments and receipts
#   static.key    32 bytes   X25519 private key, payee role only: the Noise responder key the QR shows
#   cert.bin      138/170    the device certificate (wire format); the role comes from it
#   issuer.pub    65 bytes   the issuer's P-256 public key, uncompressed SEC1: checks every certificate
#   backend.pub   65 bytes   the backend's P-256 public key: checks vouchers, acknowledgements, statuses
#   backend.kx    32 bytes   optional: the backend's X25519 static key, the responder key of the sync session
#                            (docs/protocol.md §10); a device without it cannot sync end to end encrypted
#   config.json   optional   {"name": "till-1", "app": "card" | "terminal", "amount": 10000, "qr_amount": false,
#                            "sync_every_s": 300, "wifi": {"ssid": .., "password": .., "backend": "http://.."}}
#   final         8 bytes    the lock: the certificate's device id, written by the provisioning's finalise
#                            (paytoken.provisioning) as its very last step; until then the device cannot pay
#
#   load(root, pending=False) -> Device   every file read and cross-checked; StoreError if anything is missing
#                             or wrong, or (unless pending) the store is not finalised
#   provision(root, ...)      the same checks on the new contents first, then every file written atomically,
#                             `final` last (the all-at-once path of the host's simulated devices)
#
# A device without a complete, consistent, finalised store is unprovisioned: load() raises StoreError and the
# device must not pay (main.py runs the USB provisioning service instead). Writes go to name + ".tmp" and
# are renamed over the old file, atomic on LittleFS, so a cut leaves the old file or the new one, never half
# of one.
import json
import os

from paytoken import wire
from paytoken.crypto import p256, x25519
from paytoken.trust import key_id

MISSING = "missing"
CORRUPT = "corrupt"
MISMATCH = "mismatch"

APPS = ("card", "terminal")
_NAME_MAX = 16


class StoreError(Exception):
    def __init__(self, kind, name, detail=""):
        super().__init__("store: %s %s%s" % (name, kind, ": " + detail if detail else ""))
        self.kind = kind
        self.name = name


def path(root, *parts):
    p = root.rstrip("/")
    for part in parts:
        p += "/" + part
    return p


def ledger_path(root):
    return path(root, "ledger", "wallet.log")


class Device:
    # What load() returns: the checked store contents.
    def __init__(self, root, identity_priv, cert_raw, cert, issuer_pub, backend_pub, static_priv, static_pub,
                 config, backend_kx=None):
        self.root = root
        self.identity_priv = identity_priv
        self.cert_raw = cert_raw
        self.cert = cert
        self.issuer_pub = issuer_pub
        self.backend_pub = backend_pub
        self.static_priv = static_priv
        self.static_pub = static_pub
        self.config = config
        self.backend_kx = backend_kx
        self.ledger_path = root and ledger_path(root)

    @property
    def app(self):
        # "terminal" (payee) or "card" (payer); a device certified for both roles follows its config
        role = self.cert.role
        if role == wire.ROLE_PAYEE:
            return "terminal"
        if role == wire.ROLE_PAYER:
            return "card"
        return self.config.get("app", "card")

    @property
    def name(self):
        return self.config.get("name") or ("payee" if self.app == "terminal" else "payer")


def _read(root, name, optional=False):
    try:
        with open(path(root, "store", name), "rb") as f:
            return f.read()
    except OSError:
        if optional:
            return None
        raise StoreError(MISSING, name)


def _check_pub(name, pub):
    if len(pub) != 65 or pub[0] != 4:
        raise StoreError(CORRUPT, name, "not a 65-byte uncompressed P-256 key")
    try:
        p256.decode_point(pub)
    except ValueError:
        raise StoreError(CORRUPT, name, "not a point on P-256")


def _config(raw):
    if raw is None:
        return {}
    try:
        cfg = json.loads(raw)
    except ValueError:
        raise StoreError(CORRUPT, "config.json", "not JSON")
    if not isinstance(cfg, dict):
        raise StoreError(CORRUPT, "config.json", "not an object")
    name = cfg.get("name")
    if name is not None and not (isinstance(name, str) and 0 < len(name) <= _NAME_MAX and " " not in name):
        raise StoreError(CORRUPT, "config.json", "name: 1-16 characters, no spaces")
    if cfg.get("app", "card") not in APPS:
        raise StoreError(CORRUPT, "config.json", "app: card or terminal")
    amount = cfg.get("amount")
    if amount is not None and not (isinstance(amount, int) and not isinstance(amount, bool) and 0 < amount < 1 << 32):
        raise StoreError(CORRUPT, "config.json", "amount: minor units, 1 to 2^32-1")
    if not isinstance(cfg.get("qr_amount", False), bool):
        raise StoreError(CORRUPT, "config.json", "qr_amount: true or false")
    every = cfg.get("sync_every_s")
    if every is not None and not (isinstance(every, int) and not isinstance(every, bool) and 0 < every < 1 << 31):
        raise StoreError(CORRUPT, "config.json", "sync_every_s: seconds, 1 or more")
    wifi = cfg.get("wifi")
    if wifi is not None and not (isinstance(wifi, dict) and isinstance(wifi.get("ssid"), str)
                                 and isinstance(wifi.get("backend"), str)):
        raise StoreError(CORRUPT, "config.json", 'wifi: {"ssid", "password", "backend"}')
    return cfg


def check(root, identity_priv, cert_raw, issuer_pub, backend_pub, static_priv=None, config_raw=None,
          backend_kx=None):
    # Every file's format and how they fit together; the Device, or StoreError naming the first problem.
    # The issuer's signature on the certificate is Trust's to check (paytoken.app.start does it on boot).
    if len(identity_priv) != 32:
        raise StoreError(CORRUPT, "identity.key", "not 32 bytes")
    try:
        cert = wire.decode_cert(cert_raw)
    except ValueError as e:
        raise StoreError(CORRUPT, "cert.bin", str(e))
    _check_pub("issuer.pub", issuer_pub)
    _check_pub("backend.pub", backend_pub)
    if cert.issuer_key_id != key_id(issuer_pub):
        raise StoreError(MISMATCH, "cert.bin", "issued under another issuer key than issuer.pub")
    try:
        pub = p256.public_key(identity_priv)
    except ValueError as e:
        raise StoreError(CORRUPT, "identity.key", str(e))
    if bytes((2 + (pub[64] & 1),)) + pub[1:33] != cert.identity_pub:
        raise StoreError(MISMATCH, "identity.key", "not the key the certificate names")
    static_pub = None
    if cert.role & wire.ROLE_PAYEE:
        if static_priv is None:
            raise StoreError(MISSING, "static.key")
        if len(static_priv) != 32:
            raise StoreError(CORRUPT, "static.key", "not 32 bytes")
        static_pub = x25519.public_key(static_priv)
        if static_pub != cert.x25519_pub:
            raise StoreError(MISMATCH, "static.key", "not the key the certificate names")
    if backend_kx is not None and len(backend_kx) != 32:
        raise StoreError(CORRUPT, "backend.kx", "not 32 bytes")
    return Device(None, bytes(identity_priv), bytes(cert_raw), cert, bytes(issuer_pub), bytes(backend_pub),
                  static_priv and bytes(static_priv), static_pub, _config(config_raw),
                  backend_kx and bytes(backend_kx))


FINAL = "final"


def load(root, pending=False):
    # pending=True: the provisioning's own view of a store it is still building (no lock needed yet)
    dev = check(root, _read(root, "identity.key"), _read(root, "cert.bin"), _read(root, "issuer.pub"),
                _read(root, "backend.pub"), _read(root, "static.key", True), _read(root, "config.json", True),
                _read(root, "backend.kx", True))
    if not pending:
        final = _read(root, FINAL, True)
        if final is None:
            raise StoreError(MISSING, FINAL, "provisioning not finalised")
        if final != dev.cert.device_id:
            raise StoreError(MISMATCH, FINAL, "finalised for another device id")
    dev.root = root
    dev.ledger_path = ledger_path(root)
    return dev


def mkdirs(root):
    _mkdir(path(root, "store"))
    _mkdir(path(root, "ledger"))


def _mkdir(p):
    try:
        os.mkdir(p)
    except OSError:
        pass  # there already (a real failure shows when the file is written)


def read(root, name):
    # One store file's bytes, or None when it is not there.
    return _read(root, name, True)


def write(root, name, data):
    # One store file, atomically (name.tmp renamed over name).
    _write(root, name, data)


def remove(root, name):
    _remove(root, name)


def _write(root, name, data):
    final = path(root, "store", name)
    tmp = final + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, final)


def _remove(root, name):
    try:
        os.remove(path(root, "store", name))
    except OSError:
        pass


def provision(root, identity_priv, cert_raw, issuer_pub, backend_pub, static_priv=None, config=None,
              backend_kx=None):
    # Checks the new store as load() would, then writes it. A device already holding a ledger of another
    # device id is refused: its records (money) belong to that identity and would be orphaned.
    config_raw = None if config is None else json.dumps(config).encode()
    dev = check(root, identity_priv, cert_raw, issuer_pub, backend_pub, static_priv, config_raw, backend_kx)
    old = _read(root, "cert.bin", True)
    if old is not None:
        try:
            old_id = wire.decode_cert(old).device_id
        except ValueError:
            old_id = None
        if old_id != dev.cert.device_id and exists(ledger_path(root)):
            raise StoreError(MISMATCH, "cert.bin", "the ledger on this device belongs to another device id")
    mkdirs(root)
    _remove(root, FINAL)
    # cert.bin goes last, then the lock. A cut before it leaves new keys beside the old certificate, which
    # load() refuses (mismatch), or for a renewal with the same keys the old certificate with the new files; running the
    # provisioning again completes it either way.
    _write(root, "identity.key", dev.identity_priv)
    if static_priv is not None:
        _write(root, "static.key", dev.static_priv)
    else:
        _remove(root, "static.key")
    _write(root, "issuer.pub", dev.issuer_pub)
    _write(root, "backend.pub", dev.backend_pub)
    if backend_kx is not None:
        _write(root, "backend.kx", dev.backend_kx)
    else:
        _remove(root, "backend.kx")
    if config_raw is not None:
        _write(root, "config.json", config_raw)
    else:
        _remove(root, "config.json")
    _write(root, "cert.bin", dev.cert_raw)
    _write(root, FINAL, dev.cert.device_id)
    return load(root)


def exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False
