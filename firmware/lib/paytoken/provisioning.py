# The provisioning requests of the USB serial service (docs/protocol.md §11, docs/architecture.md
# "Provisioning"): pure logic over paytoken.store, no hardware. Every step is idempotent and its state is in
# flash, so a power cut or a pulled cable leaves a device that resumes (the station runs the steps again) and
# that cannot pay before finalise (store.load() refuses a store without its `final` lock).
#
#   IDENTIFY  ()                                -> JSON {"v", "chip", "fw", "fw_hash", "state", "id", "role",
#                                                  "issuer", "cert", "balance"}; state blank | keys | certified |
#                                                  final; id, role from the keys step; issuer (key id), cert
#                                                  (hex) and balance once a certificate is installed
#   KEYS      role u8, device id 8, challenge 32 -> identity pub 65, [X25519 pub 32 for a payee], sig 64
#             The keys are made here from the hardware RNG and written to flash (store/identity.key,
#             store/static.key, then store/prov.json naming the id and role); asked again for the same id
#             and role, the same keys answer. sig: P-256 with the new identity key over pop_message().
#   INSTALL   cert len u16, cert, issuer pub 65, backend pub 65, kx len u8, backend kx 0|32, config JSON (rest)
#             checked as store.check() and Trust.check_cert() would on boot, then written (cert.bin last)
#   VOUCHER   a backend-signed load voucher     -> balance u32, applied u8 (0: it was already)
#   FINALISE  device id 8                       -> (empty); writes the lock; the device then restarts.
# After finalise every request but IDENTIFY gets E_LOCKED: the only way back is a full wipe (erase the flash
# and flash the firmware again, docs/security.md).
import json
import struct

from paytoken import store, wire
from paytoken.usb import frames
from paytoken.usb.service import Error

PROV = "prov.json"
TYPES = (frames.T_IDENTIFY, frames.T_KEYS, frames.T_INSTALL, frames.T_VOUCHER, frames.T_FINALISE)
pop_message = frames.pop_message


def _hex(b):
    from binascii import hexlify

    return hexlify(b).decode() if b is not None else None


class Provisioning:
    TYPES = TYPES

    def __init__(self, root, chip="unknown", entropy=None):
        # entropy: board.usb().rng_entropy, called around key generation; it starts an entropy source for
        # the hardware RNG (the ESP32's radio) and returns the function that stops it again
        self.root = root
        self.chip = chip
        self.entropy = entropy
        self.stop = None

    # ---- state, all of it from flash ----
    def _pending(self):
        raw = store.read(self.root, PROV)
        if raw is None:
            return None
        try:
            p = json.loads(raw)
            from binascii import unhexlify

            return unhexlify(p["id"]), p["role"]
        except (ValueError, KeyError, TypeError):
            return None

    def _final(self):
        return store.read(self.root, store.FINAL) is not None

    def _device(self):
        # The store as far as it is built: (Device, Trust) once a checked certificate is installed, else None.
        from paytoken.trust import Trust

        try:
            dev = store.load(self.root, pending=True)
        except store.StoreError:
            return None
        return dev, Trust(dev.issuer_pub, dev.backend_pub)

    def state(self, got=None):
        # blank | keys | certified | final; got: _device() if the caller has it already
        if self._final():
            return "final"
        if got is None and store.read(self.root, "cert.bin") is not None:
            got = self._device()
        if got is not None:
            return "certified"
        return "keys" if self._pending() is not None else "blank"

    def handle(self, rtype, p):
        if rtype == frames.T_IDENTIFY:
            return self.identify()
        if self._final():
            raise Error(frames.E_LOCKED, "finalised: provisioning is over (a full wipe starts again)")
        if rtype == frames.T_KEYS:
            return self.keys(p)
        if rtype == frames.T_INSTALL:
            return self.install(p)
        if rtype == frames.T_VOUCHER:
            return self.voucher(p)
        return self.finalise(p)

    def identify(self):
        import paytoken

        try:
            from paytoken import fwinfo

            fw_hash = fwinfo.HASH
        except ImportError:
            fw_hash = None
        got = self._device() if store.read(self.root, "cert.bin") is not None else None
        st = self.state(got)
        info = {"v": 1, "chip": self.chip, "fw": paytoken.VERSION, "fw_hash": fw_hash, "state": st,
                "id": None, "role": None, "issuer": None, "cert": None, "balance": None}
        if got is not None:
            dev = got[0]
            info["id"], info["role"] = _hex(dev.cert.device_id), dev.cert.role
            info["issuer"] = _hex(dev.cert.issuer_key_id)
            info["cert"] = _hex(dev.cert_raw)
            info["balance"] = self._balance(dev, got[1]) if store.exists(dev.ledger_path) else 0
        else:
            pend = self._pending()
            if pend is not None:
                info["id"], info["role"] = _hex(pend[0]), pend[1]
        return json.dumps(info).encode()

    def _balance(self, dev, trust):
        from paytoken.wallet import Wallet

        w = Wallet(dev.ledger_path, dev.identity_priv, dev.cert_raw, trust)
        try:
            return w.balance
        finally:
            w.ledger.close()

    # ---- the steps ----
    def keys(self, p):
        if len(p) != 1 + wire.ID_LEN + 32:
            raise Error(frames.E_REQUEST, "keys: role, device id 8, challenge 32")
        role, device_id, challenge = p[0], bytes(p[1:9]), bytes(p[9:])
        if role not in (wire.ROLE_PAYER, wire.ROLE_PAYEE, wire.ROLE_PAYER | wire.ROLE_PAYEE):
            raise Error(frames.E_REQUEST, "keys: unknown role %d" % role)
        root = self.root
        identity = static = None
        if self._pending() == (device_id, role):
            identity = store.read(root, "identity.key")
            static = store.read(root, "static.key") if role & wire.ROLE_PAYEE else None
            if identity is None or len(identity) != 32 or (role & wire.ROLE_PAYEE and
                                                           (static is None or len(static) != 32)):
                identity = None
        if identity is None:
            self._new_keys(device_id, role)
            identity = store.read(root, "identity.key")
            static = store.read(root, "static.key")
        from paytoken.crypto import p256, x25519

        pub = p256.public_key(identity)
        xpub = x25519.public_key(static) if role & wire.ROLE_PAYEE else b""
        sig = p256.sign(identity, pop_message(challenge, device_id, role, pub, xpub))
        return pub + xpub + sig

    def _new_keys(self, device_id, role):
        from paytoken.crypto import p256, rand

        root = self.root
        if store.exists(store.ledger_path(root)):
            # a load voucher may already sit in it: its money belongs to the identity the ledger was made for
            pend = self._pending()
            raise Error(frames.E_STATE, "this device holds a ledger of device %s: provision it with that id"
                        % (_hex(pend[0]) if pend else "?"))
        store.mkdirs(root)
        store.remove(root, "cert.bin")  # from an earlier attempt: it names other keys
        store.remove(root, PROV)
        off = self.entropy() if self.entropy else None
        try:
            identity = rand.random_scalar(p256.N).to_bytes(32, "big")
            static = rand.random_bytes(32) if role & wire.ROLE_PAYEE else None
        finally:
            if off:
                off()
        store.write(root, "identity.key", identity)
        if static is not None:
            store.write(root, "static.key", static)
        else:
            store.remove(root, "static.key")
        store.write(root, PROV, json.dumps({"id": _hex(device_id), "role": role}).encode())

    def install(self, p):
        pend = self._pending()
        if pend is None:
            raise Error(frames.E_STATE, "install: no keys yet (KEYS first)")
        try:
            n = struct.unpack_from(">H", p, 0)[0]
            cert = bytes(p[2:2 + n])
            o = 2 + n
            issuer, backend = bytes(p[o:o + 65]), bytes(p[o + 65:o + 130])
            k = p[o + 130]
            kx = bytes(p[o + 131:o + 131 + k]) if k else None
            config = bytes(p[o + 131 + k:]) or None
        except (IndexError, ValueError):
            raise Error(frames.E_REQUEST, "install: truncated")
        if len(cert) != n or len(issuer) != 65 or len(backend) != 65:
            raise Error(frames.E_REQUEST, "install: truncated")
        root = self.root
        try:
            c = wire.decode_cert(cert)
        except ValueError as e:
            raise Error(frames.E_REFUSED, "certificate: %s" % e)
        if (c.device_id, c.role) != pend:
            raise Error(frames.E_REFUSED, "certificate: for another device id or role than the keys")
        try:
            dev = store.check(root, store.read(root, "identity.key") or b"", cert, issuer, backend,
                              store.read(root, "static.key"), config, kx)
        except store.StoreError as e:
            raise Error(frames.E_REFUSED, str(e))
        from paytoken.reasons import Refused
        from paytoken.trust import Trust

        try:
            Trust(issuer, backend).check_cert(cert, c.role)
        except Refused as r:
            raise Error(frames.E_REFUSED, "certificate not signed by the issuer key given (%s)" % r)
        store.mkdirs(root)
        store.write(root, "issuer.pub", dev.issuer_pub)
        store.write(root, "backend.pub", dev.backend_pub)
        if kx is not None:
            store.write(root, "backend.kx", kx)
        else:
            store.remove(root, "backend.kx")
        if config is not None:
            store.write(root, "config.json", config)
        else:
            store.remove(root, "config.json")
        store.write(root, "cert.bin", cert)
        return b""

    def _certified(self, what):
        got = self._device()
        if got is None:
            raise Error(frames.E_STATE, "%s: no certificate installed (INSTALL first)" % what)
        return got

    def voucher(self, p):
        dev, trust = self._certified("voucher")
        from paytoken.reasons import Refused
        from paytoken.wallet import Wallet

        w = Wallet(dev.ledger_path, dev.identity_priv, dev.cert_raw, trust)
        try:
            try:
                changed = w.apply_update(bytes(p))
            except Refused as r:
                raise Error(frames.E_REFUSED, "voucher: %s" % r)
            return struct.pack(">IB", w.balance, 1 if changed else 0)
        finally:
            w.ledger.close()

    def finalise(self, p):
        dev, trust = self._certified("finalise")
        if bytes(p) != dev.cert.device_id:
            raise Error(frames.E_REQUEST, "finalise: send the device id being finalised")
        from paytoken.reasons import Refused

        try:
            trust.check_cert(dev.cert_raw, dev.cert.role)
        except Refused as r:
            raise Error(frames.E_REFUSED, "certificate: %s" % r)
        store.write(self.root, store.FINAL, dev.cert.device_id)
        store.remove(self.root, PROV)
        self.stop = "restart"
        return b""


def serve(root, port, chip="unknown", entropy=None):
    # The provisioning service on `port` until finalise ("restart") or the link closes ("closed").
    from paytoken.usb.service import Service

    svc = Service(port)
    svc.register(Provisioning(root, chip, entropy))
    return svc.serve()
