# Noise Protocol Framework, revision 34 (noiseprotocol.org/noise.html), for the one suite the device
# speaks: Noise_<pattern>_25519_AESGCM_SHA256. CipherState, SymmetricState and HandshakeState follow
# sections 5.1-5.3; the fundamental patterns of section 7 run on one token machine driven by a table.
#
# Fail closed: any error (bad tag, bad length, call out of turn, all-zero DH) raises NoiseError and
# kills the object, which then refuses every further call. A session never goes on after one of its
# messages was rejected, so an attacker gets exactly one try per session.
from hashlib import sha256

from micropython import const

from paytoken.crypto import aesgcm, kdf, rand, x25519

MAX_MESSAGE = const(65535)  # section 3: every Noise message, handshake or transport
_DHLEN = const(32)
_TAGLEN = const(16)
_MAX_NONCE = const(0xFFFFFFFFFFFFFFFF)  # 2^64-1: reserved by section 5.1, never used for a message

# Section 7: "name:initiator pre-message|responder pre-message|message 1|message 2|...".
# A DH token names the initiator's key first: in "es" the initiator's e meets the responder's s.
# One string constant: frozen, it stays in flash; only the chosen line is ever copied to RAM.
_PATTERNS = """
N:|s|e es
K:s|s|e es ss
X:|s|e es s ss
NN:||e|e ee
NK:|s|e es|e ee
NX:||e|e ee s es
KN:s||e|e ee se
KK:s|s|e es ss|e ee se
KX:s||e|e ee se s es
XN:||e|e ee|s se
XK:|s|e es|e ee|s se
XX:||e|e ee s es|s se
IN:||e s|e ee se
IK:|s|e es s ss|e ee se
IX:||e s|e ee se s es
"""


class NoiseError(ValueError):
    pass


def _dead():
    return NoiseError("noise: session ended by an earlier failure")


def _nonce(n):
    # Section 12.3: 4 zero bytes || 64-bit big-endian n; n < 2^64, so one 12-byte encoding is it.
    return n.to_bytes(12, "big")


def _hkdf(ck, ikm, outputs):
    # Section 4.3: Noise's own HKDF (not RFC 5869 with info): 2 or 3 outputs chained over HMAC.
    tk = kdf.hmac_sha256(ck, ikm)
    o1 = kdf.hmac_sha256(tk, b"\x01")
    o2 = kdf.hmac_sha256(tk, o1 + b"\x02")
    if outputs == 2:
        return o1, o2
    return o1, o2, kdf.hmac_sha256(tk, o2 + b"\x03")


class CipherState:
    # Section 5.1. The key lives only in the cached AESGCM object (key schedule and powers of H),
    # built on first use: some handshake keys (KK's es key) are replaced before they encrypt anything.

    def __init__(self, k=None):
        self._dead = False
        self.initialize_key(k)

    def _fail(self, msg):
        self._dead = True
        self._k = None
        self._aead = None
        return NoiseError("noise: " + msg)

    def initialize_key(self, k):
        if self._dead:
            raise _dead()
        if k is not None and len(k) != 32:
            raise self._fail("key must be 32 bytes")
        self._k = k
        self._aead = None
        self.n = 0

    def has_key(self):
        if self._dead:
            raise _dead()
        return self._k is not None or self._aead is not None

    def set_nonce(self, n):
        if self._dead:
            raise _dead()
        self.n = n

    def _cipher(self):
        a = self._aead
        if a is None:
            a = self._aead = aesgcm.AESGCM(self._k)
            self._k = None
        return a

    def encrypt_with_ad(self, ad, plaintext):
        if not self.has_key():
            return bytes(plaintext)
        n = self.n
        if n >= _MAX_NONCE:
            raise self._fail("nonce exhausted")
        if len(plaintext) > MAX_MESSAGE - _TAGLEN:
            raise self._fail("message too long")
        ct = self._cipher().encrypt(_nonce(n), plaintext, ad)
        self.n = n + 1
        return ct

    def decrypt_with_ad(self, ad, ciphertext):
        if not self.has_key():
            return bytes(ciphertext)
        n = self.n
        if n >= _MAX_NONCE:
            raise self._fail("nonce exhausted")
        ln = len(ciphertext)
        if ln < _TAGLEN or ln > MAX_MESSAGE:
            raise self._fail("bad message length")
        try:
            pt = self._cipher().decrypt(_nonce(n), ciphertext, ad)
        except ValueError:
            raise self._fail("decryption failed")
        self.n = n + 1
        return pt

    def rekey(self):
        # Section 4.2: k = first 32 bytes of ENCRYPT(k, 2^64-1, empty, 32 zeros); n is kept.
        if self.has_key():
            k = self._cipher().encrypt(_nonce(_MAX_NONCE), bytes(32), b"")
            self._aead = None
            self._k = k[:32]


class SymmetricState:
    # Section 5.2.

    def __init__(self, protocol_name):
        if len(protocol_name) <= 32:
            h = protocol_name + bytes(32 - len(protocol_name))
        else:
            h = sha256(protocol_name).digest()
        self.ck = h
        self.h = h
        self.cs = CipherState()

    def mix_key(self, ikm):
        self.ck, k = _hkdf(self.ck, ikm, 2)
        self.cs.initialize_key(k)

    def mix_hash(self, data):
        s = sha256(self.h)
        s.update(data)
        self.h = s.digest()

    def mix_key_and_hash(self, ikm):
        # For psk modes; no pattern in the table uses it.
        self.ck, th, k = _hkdf(self.ck, ikm, 3)
        self.mix_hash(th)
        self.cs.initialize_key(k)

    def get_handshake_hash(self):
        return self.h

    def encrypt_and_hash(self, plaintext):
        ct = self.cs.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext):
        pt = self.cs.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return pt

    def split(self):
        k1, k2 = _hkdf(self.ck, b"", 2)
        return CipherState(k1), CipherState(k2)


def _pattern(name):
    # -> [initiator pre-message, responder pre-message, message 1, ...] of a section 7 pattern
    if not isinstance(name, str) or not name:
        raise NoiseError("noise: unknown pattern")
    for c in name:
        if c not in "NKXI":  # also keeps the lookup below on whole lines
            raise NoiseError("noise: unknown pattern " + name)
    i = _PATTERNS.find("\n" + name + ":")
    if i < 0:
        raise NoiseError("noise: unknown pattern " + name)
    i += len(name) + 2
    return _PATTERNS[i : _PATTERNS.find("\n", i)].split("|")


class HandshakeState:
    # Section 5.3. s and e are X25519 private keys (e only for test vectors), rs the remote static
    # public key. s_pub, the public key of s, may be passed to save one X25519 (it is not checked:
    # a wrong one makes the peer's decryption fail). After the last message split() returns the
    # transport CipherStates: c1 initiator -> responder, c2 responder -> initiator.

    def __init__(self, pattern, initiator, prologue=b"", s=None, rs=None, e=None, s_pub=None):
        parts = _pattern(pattern)
        self.initiator = initiator = bool(initiator)
        for k in (s, rs, e, s_pub):
            if k is not None and len(k) != _DHLEN:
                raise NoiseError("noise: keys must be 32 bytes")
        self._msgs = msgs = parts[2:]
        self._i = 0
        self._dead = False
        self._s = s
        self._spub = s_pub
        self._e = e
        self._epub = None
        self.rs = rs
        self.re = None
        self._c = None
        # Which keys the pattern needs, checked now rather than halfway through a handshake.
        local_pre = parts[0 if initiator else 1]
        remote_pre = parts[1 if initiator else 0]
        sends_s = receives_s = False
        for j in range(len(msgs)):
            if "s" in msgs[j].split():
                if (j & 1 == 0) == initiator:
                    sends_s = True
                else:
                    receives_s = True
        if (local_pre or sends_s) and s is None:
            raise NoiseError("noise: pattern " + pattern + " needs s")
        if remote_pre and rs is None:
            raise NoiseError("noise: pattern " + pattern + " needs rs")
        if receives_s and rs is not None:
            # The peer sends its s in this pattern and it would silently replace rs: a caller
            # meaning to pin a key would get no check. Compare hs.rs after the handshake instead.
            raise NoiseError("noise: pattern " + pattern + " learns rs during the handshake")
        ss = self._ss = SymmetricState(("Noise_" + pattern + "_25519_AESGCM_SHA256").encode())
        ss.mix_hash(prologue)
        # Pre-messages: the initiator's first (section 7.1); the fundamental patterns only have "s".
        for side in (0, 1):
            if parts[side]:
                ss.mix_hash(self._local_pub() if (side == 0) == initiator else rs)

    @property
    def h(self):
        return self._ss.h

    @property
    def finished(self):
        return self._c is not None

    def _local_pub(self):
        if self._spub is None:
            self._spub = x25519.public_key(self._s)
        return self._spub

    def ephemeral_public(self):
        # The public key of e, drawn now if the first message has not drawn it yet: a payload may name it (the
        # sync client binds its signed request to the handshake this way) without a second X25519.
        if self._dead:
            raise _dead()
        if self._e is None:
            self._e = rand.random_bytes(_DHLEN)
        if self._epub is None:
            self._epub = x25519.public_key(self._e)
        return self._epub

    def _fail(self, ex):
        # Wipe what could still derive keys; h is public transcript and stays readable.
        self._dead = True
        self._ss.ck = None
        self._ss.cs = None
        self._e = None
        self._s = None
        self._c = None
        if isinstance(ex, NoiseError) or not isinstance(ex, ValueError):
            return ex  # MemoryError and the like keep their type
        return NoiseError("noise: " + str(ex))  # x25519's all-zero DH result, bad lengths

    def _turn(self, writing):
        if self._dead:
            raise _dead()
        # The initiator writes messages 1, 3, 5...: index 0, 2, 4...
        if self._c is not None or ((self._i & 1) == 0) != (self.initiator == writing):
            raise self._fail(NoiseError("noise: message out of turn"))

    def _dh(self, t):
        a, b = (t[0], t[1]) if self.initiator else (t[1], t[0])
        return x25519.shared(self._e if a == "e" else self._s, self.re if b == "e" else self.rs)

    def _next(self):
        self._i += 1
        if self._i == len(self._msgs):
            ss = self._ss
            self._c = ss.split()
            ss.ck = None  # no further keys come from this handshake
            ss.cs = None
            self._e = None
            self._s = None

    def write_message(self, payload=b""):
        self._turn(True)
        try:
            if len(payload) > MAX_MESSAGE:
                raise NoiseError("noise: message too long")
            ss = self._ss
            out = []
            for t in self._msgs[self._i].split():
                if t == "e":
                    pub = self.ephemeral_public()
                    out.append(pub)
                    ss.mix_hash(pub)
                elif t == "s":
                    out.append(ss.encrypt_and_hash(self._local_pub()))
                else:
                    ss.mix_key(self._dh(t))
            out.append(ss.encrypt_and_hash(payload))
            msg = b"".join(out)
            if len(msg) > MAX_MESSAGE:
                raise NoiseError("noise: message too long")
            self._next()
            return msg
        except Exception as ex:
            raise self._fail(ex)

    def read_message(self, message):
        self._turn(False)
        try:
            mv = memoryview(message)
            n = len(mv)
            if n > MAX_MESSAGE:
                raise NoiseError("noise: message too long")
            ss = self._ss
            off = 0
            for t in self._msgs[self._i].split():
                if t == "e":
                    if n - off < _DHLEN:
                        raise NoiseError("noise: message too short")
                    self.re = bytes(mv[off : off + _DHLEN])
                    off += _DHLEN
                    ss.mix_hash(self.re)
                elif t == "s":
                    ln = _DHLEN + _TAGLEN if ss.cs.has_key() else _DHLEN
                    if n - off < ln:
                        raise NoiseError("noise: message too short")
                    self.rs = ss.decrypt_and_hash(mv[off : off + ln])
                    off += ln
                else:
                    ss.mix_key(self._dh(t))
            if n - off < _TAGLEN and ss.cs.has_key():
                raise NoiseError("noise: message too short")
            payload = ss.decrypt_and_hash(mv[off:])
            self._next()
            return payload
        except Exception as ex:
            raise self._fail(ex)

    def split(self, with_h=False):
        # (c1, c2), or (c1, c2, h) with the handshake hash for channel binding (section 11.2).
        if self._dead:
            raise _dead()
        if self._c is None:
            raise self._fail(NoiseError("noise: handshake not finished"))
        if with_h:
            return self._c[0], self._c[1], self._ss.h
        return self._c
