"""paytoken.noise (Noise rev. 34, Noise_*_25519_AESGCM_SHA256) on MicroPython.

Published cacophony vectors, interop both ways with the independent `noiseprotocol` package, the
failure cases the payment protocol relies on (tampering, wrong key, wrong prologue, replay, turn
order, sizes, nonce exhaustion) and the RAM budget of a full NK session.
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from noise.connection import Keypair, NoiseConnection

from tests.harness.mp import MicroPythonError, run_script

SUITE = "_25519_AESGCM_SHA256"
PATTERNS = ["NN", "NK", "NX", "KN", "KK", "KX", "XN", "XK", "XX", "IN", "IK", "IX", "N", "K", "X"]
MAX_MESSAGE = 65535

# Noise_*_25519_AESGCM_SHA256 entries of vectors/cacophony.txt (public domain) from
# github.com/haskell-cryptography/cacophony at 8ee9d41e34a1a596cfa3ab12aa4069ff87dc1247.
# Keys, prologue and payloads are the same in every entry; per pattern: handshake hash, then
# the ciphertext of each message (handshake messages first, then transport messages).
VEC_INIT_STATIC = bytes.fromhex("e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1")
VEC_RESP_STATIC = bytes.fromhex("4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893")
VEC_INIT_EPHEMERAL = bytes.fromhex("893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a")
VEC_RESP_EPHEMERAL = bytes.fromhex("bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b")
VEC_INIT_REMOTE_STATIC = bytes.fromhex("31e0303fd6418d2f8c0e78b91f22e8caed0fbe48656dcf4767e4834f701b8f62")
VEC_RESP_REMOTE_STATIC = bytes.fromhex("6bc3822a2aa7f4e6981d6538692b3cdf3e6df9eea6ed269eb41d93c22757b75a")
VEC_PROLOGUE = bytes.fromhex("4a6f686e2047616c74")
VEC_PAYLOADS = [
    bytes.fromhex(p)
    for p in (
        "4c756477696720766f6e204d69736573",
        "4d757272617920526f746862617264",
        "462e20412e20486179656b",
        "4361726c204d656e676572",
        "4a65616e2d426170746973746520536179",
        "457567656e2042f6686d20766f6e2042617765726b",
    )
]
VECTORS = {
    "NN": (
        "6301958d25cd7d1ffe6ad7d0ca2ad284b4e478d9acd9198f7750432d225043d0",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79444c756477696720766f6e204d69736573",
        "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843934ff73eebb9d930ebf62b8e4db8133c"
        "a936872b5551efd7c9989c646d8cf0",
        "8d372b94914e80018211a344b8b1c5a2869492a0db46990c0362f3",
        "e183b0abd55550f9955fb05476d988c6f27628d7bbde111c39ccbc",
        "167293a79ad6a647114c4f4eb55bdf713a0d44ae48765c07fc4e57743100825021",
        "2b67a18ae246069c51687bee89141041d9d35a821f852975d169a4f80f75c735807a1fd157",
    ),
    "NK": (
        "f8a87aa8add4fea6e33365b89637486c2f6564546ce29d1df9ce9abf78c507d7",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c794475ab4d66d222457dd414bc5f296bc7b4"
        "078cc7d72af5192628b68bca7d28844b",
        "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f14480884303c7d89310502baa8299520ba451624c"
        "3c0492e2698f8d457c32400b91fd8a",
        "304f70c37c93573099228016d54cb15213af94eb598d1b17df1153",
        "a1bf6c954529f29b31d8ae9f67d2c18dbd332aa1a0918690c6d80b",
        "2e8f3e51888360b2b2d83a64dde9943c7dd3c5e84ac7c4b4e2d5cfc025b6c854d3",
        "8498bf41212a8b87c9eeb408274c75b3558fd0530865b5a7932d4b3af812d85b3df27e6f33",
    ),
    "NX": (
        "3011330d120f21c20d157acf436e8ae24828bee5376bc97108575beb04563b45",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79444c756477696720766f6e204d69736573",
        "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f1448088435783d9758cb7e00c45a7d00ddc333aae"
        "968443c64f650b54a2ea7e0c1b67c27553968441fb058c1e460d676214dfbca9a3d5a445439da611c7a5697b6e6d4883"
        "32952854c05202c76277d5e02b374d",
        "019b4087a1fa140e05486824cbdf79ef1744271ffd2124feb93d97",
        "c8f304c719ab66533a42878b47b23dc8dfc839b962c675ef2bd383",
        "e9c0a2537d92e85b88fe153d731f7590b8d112e75e465aeaf91339d68392ed7fcb",
        "1a882961b52d92829830cfa356571bc32efb9075c43c7e87940464c939755bc9637253e7e7",
    ),
    "KN": (
        "a89b3209b5f21864f2e5320642d438adba7c60bf9137a899106c18215c878b48",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79444c756477696720766f6e204d69736573",
        "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f1448088435a3c4ed5989f00950bc6b7bae756d71e"
        "fe3aab64ad205327b707923803aecb",
        "1e82588a49c35bec1703ad39e03525db224beb2c3b81a5da4aae72",
        "5787874f33246c556f9454d7861c90e297f49bb38e2dfe4382deea",
        "7e0e20c0ad0e1b71ffb16591fa25bfeb9111ecfcd1feb2f11e1cdbbaea3fae43e3",
        "0a02e2d245fdf5a24c86c7561bc2e08ca3afac3baa63dd5dc8b6eae8fce0e0b8777315bd0a",
    ),
    "KK": (
        "c03693acd830588fac76dd414c9e100e8c601d27511de855100239f7705fa3f2",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79448564738a841228e693caeec4c497a8bd"
        "562231c3e51a1f03c4fd45dfe3a67870",
        "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843b94504c4d83506f5dd2568b68490eba8"
        "ed6f9cf2cca194a273c56d7ae3c558",
        "6a5c10a201d4e3a08f79f64949e55731f774913a4d949bda3fcebf",
        "4e8a1bf06926fdd74e2f516e2b0c11cc1dc3387fadeb75389d4342",
        "c1df7194ca8ea51d4dd99059bc9b90288112d47237d8481f1773fb26a31629a05c",
        "3edba4feaf590ee88dd8f5fba51db4bee651cf41afd410fe476c524ac9b1db24252fc55ff8",
    ),
    "KX": (
        "3c6a56a8e3bb67120369557545f8133dd78a70185d5e0f03fd4a04c868c3293b",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79444c756477696720766f6e204d69736573",
        "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f1448088433fe0cc494a11d8fc6d5ed97b43e8d83f"
        "e5a22449be08177b3e252a26d64f5f64e2ef7887a1293a597d2c46360235c1b383e7de1601cc5a8c12e12fbda1c1edad"
        "6c55db3c95b36195e27b1cafdabb02",
        "f0ce459cff0821f942c74a3aff72c451144f25c45bdf36b7704423",
        "3383b14fd43611b1e198baa0132db4c7f50873ebf1ef20969c2d14",
        "bbd07cfa9ce062fbada58ed6042320eb4fd8dc8c51e2114bec65a627f771046c3b",
        "ccf9e14a838a09f94018d50d25b1d03fe8aebf0ef4755e82cbf4d7e28deae7ff8b6356b4f0",
    ),
    "XN": (
        "ea857410640563bf41a6f634ff0a10d53cea36c7c66acb2c48fed81f451968aa",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79444c756477696720766f6e204d69736573",
        "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f1448088432609b1c16c1a7b919a1b1599ab7b31ff"
        "a65db3f69ba01d5555389f8bd71ef8",
        "3f36cdf504eee34b41d39cd0c6bfcc1d1a49e01eca9332fe2bb20547ccd72e8cf86363ccce188e9721381b87b151949f"
        "1bc8163885dfc259461e9b5fa7dd43f1b41e257352570e22623e29",
        "42f8a23fb33bc1f0ca3dc2ba23fcdd2bb50b40f4054f3297e77129",
        "8180b4694643f5b32774e356e2db7a849f37599614aa86c5493668cc76a44f92a4",
        "870a4ea3433b76c31a3ea48bf660067143acbd7a5e9977968adf8ed83671fb7dc995120c75",
    ),
    "XK": (
        "4f5a40e425d3adcdb2c715d988e4ef8763ed0f8aa0fe78e2d2879d71b2d38186",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c7944e11634ba393ac9f93896f767741fe729"
        "7c64b52a95b20bc07a8c5983eb100a5e",
        "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843aabea6c8883a5a6de7804420322c7099"
        "4289ffe724df10411be50430b113da",
        "99e0eed98437100ab575e5aa157f20ae23f024a43c58628646991c47e81e64af9c46165872069c5794e99a6d11614298"
        "6f3b803df2a6c12f39702f669d5d7818511d6b41218f19cea974ea",
        "c0502067840ee81f03a76badcc8c4264847069452a9f7531d74f68",
        "e2ce8208bd0c04c6ad779ae52b429d8cb6128a245297857e2c593576c75098b071",
        "5b75e02c3584b6b202de94cc05d6063970c9da7e67283c258820381207706cd767b5b1152d",
    ),
    "XX": (
        "1b7aefb1125762aa21a252890d00af54519638b76437444538f9a52f21e2e0dc",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79444c756477696720766f6e204d69736573",
        "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843757117acceb05bd7a45733bc22015c97"
        "a9d0cbaf41b80446d5988ff5127235d76b79eade70f473d6a4ef521fdcbeda5340d01e028ba793fc059f2724a83af05f"
        "12dda0448a7621a926b379a92477fd",
        "c90f1cf77eba4e50edb038991565e36c9758943a989229b6051244dc4fbecb6946744b401af2ee1a5881b65fbb87fd07"
        "cb6a328ececc9ce6ce84c399dc332d4fd521fa4bb7f467ce909395",
        "bc3fa77f6aca3e8466d7dc6bea10013e88a6a29add5132b461806c",
        "250b01074cdfe0df2ecf8ccbf1737b15a2ddb5b52fd9a396604e9c793cee3b3bb9",
        "449d4d433b3cdc3d02bf6fc881774b9df54366ebcffb9689bb13f14709822cd7ef42bcdb4d",
    ),
    "IN": (
        "7bcab21e118355452f104373e6e92d151122c23688ca5ce9fd24f7f6fe0f8190",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79446bc3822a2aa7f4e6981d6538692b3cdf"
        "3e6df9eea6ed269eb41d93c22757b75a4c756477696720766f6e204d69736573",
        "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f1448088430dc5a5f812c94a493da4e62c41bfe89f"
        "3aa7e414897f44f3447fbdbdc71173",
        "7071f1dc6fe0626f2aa7b140d56210d84b8e6711a47dbf697df53e",
        "8ddcb0772ff0fb9ff7ea63492353e55287191bcd1b2168112166f8",
        "66acc4b051c29df252767165a0b60d18bf869892233c5c48c9b530c7c689c999c3",
        "0e5bf2f00aa7d9ed4c3d59383e9aa776c509dacf0381337517cac4214cbda533ac1b686cd3",
    ),
    "IK": (
        "669c8640d9e42a3cda2f232f78597ceefb01daa6e3df81181ccce6fc6b5026bf",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79444e417bc55c7a8166c993356c1be41ef6"
        "7818a292426f301556c7f26b21d25ddb097153891a9a956cff47b83e63ad8d701c1342c209cff1ca5ecd43402762ac24"
        "9e3bd3a4c0a145fe07cb5dae28ea13a3",
        "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843af2ccf9972e22afc67aeafcd25162f7f"
        "98c363b7762e3e4cb7d272e39f27a5",
        "66acfc92e3197de166809e6d4d5d003dcc819a84bc3522ca53c9d9",
        "71f89aa6533a6de70b0826864dd75f60806ee40170c16290189eb3",
        "4795a3423550c8bf00386bd496a3e2c76c10669d2a75ab8f79b5094c5412a25705",
        "aa0bb39097555c918e40be82abc2b909eb79d9eb87adb07e268fc37323a6cf904fd01fb391",
    ),
    "IX": (
        "a59954350219531eec9452c90afca10db17192bbd066a936c89f81490a77ba05",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79446bc3822a2aa7f4e6981d6538692b3cdf"
        "3e6df9eea6ed269eb41d93c22757b75a4c756477696720766f6e204d69736573",
        "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f14480884381f5e7fd3177b25f05504a881c3d9abb"
        "4ceaa6e8ab72f7925bc1ecee7f533d4d83453c68b45114148f3d11c0281c89906e4c23267b3d038eeb789a7ade71edd0"
        "8ef12236e741eda973e5baba4bc005",
        "60faff0c912ae6003ff00295f240b28e8f68f3442e26661701cd7f",
        "746cac398c37a680d8ee7836a7826a164383f562bcac347bbde807",
        "4b5e9102aea574262f84bcb6bb32ff74447d843d389811990b5a55bd450708f2fc",
        "c70aa2cb23b02335b30b44e46da0c9ec2569bfaf389431a92566c794787ce9c7702d7f7bdb",
    ),
    "N": (
        "a0ade8324bb678105734fd68f9968c4045f993547de138803ab5aa8e7169b53b",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c7944579bcbff029d662564fea10d56302331"
        "2ca97f6dcd2a0ff611e8ee5352825435",
        "ece41448702945ed9004d6d83e98f24eadf3ba377084829bcc1508f37ebf52",
        "c23a5f1fbd44cc5ccf9f5173dbdc269cd62e4d3da636f9f7d86da8",
        "3f75522cb7de92072d28d7f2aed8eaec0a16e4a2f72cfc533656c8",
        "a6d69707c4915cb7322a678c01e212005f11a948e5fb22506aa81943793c6c289f",
        "6d1a4b057667d4b8ae113f219c53b57c4c3574b259701f0e0e77d762c1188b04fa76d255f4",
    ),
    "K": (
        "9b20b0e928f41c5307c239deaa547f0d1f3d8779bd7c896dcf8e8834a7ae892c",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c7944f75d2d26eb79461435b90a9f4076d5a5"
        "277b8d38d1568b56c6b3771d783671a0",
        "236767f037ced36a107c5c1bfcd644cd2ae03b869e81a1badcf03356216fd0",
        "8cde7c4f4afd43409d484b1e84a35da1beccaf89f0b39266550c50",
        "63acef2b861e6156b1a69fad0be572434b0e9d35f1b8a89cdd001a",
        "00a58a555ed9683f9f3b977fcf43caf9d8d791e40127193a9a54cbc055d12f5d0b",
        "b9b47f47f3e163e62e870bd30623feb950a45cbf4cc0b4ed18ad828eef637fce156b4cebba",
    ),
    "X": (
        "e761ec4e29a2d951745dcad46b28d1211c550bdd94042500f51dd4d789e456b0",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c794470bc7d4db4b390c2b19e03d60cf1ee86"
        "30c74c121706378730dcf60ef41a212c23c47ef2f4ab632abfc6258a30ca2149e2c2f8756c40d832fc206e31a5f64087"
        "b6fba7638c9a9fdd2eee96f9ea816629",
        "68356b58d8500a2edc2c10a5941b9aaa0cb9b9e47cc125424300a56693775d",
        "9d783c351fd707625359d5a1de888fa4be80ea48ad0a1fc3a42fe6",
        "d121d6dce3ce77ad12ea7542dc23f2e0fd24b62ca7035a85a00fc8",
        "1a97fc0b1fe571b2e489dd6b8c682084a4d14f7c02b380afddf8ad0e031c362c20",
        "7011c403c92a9069047e2f00203877ad80c565c118cea0d4d6813589e9a15701d62e2236fe",
    ),
}

# Helpers run inside the MicroPython process: loops of hundreds of handshake steps stay
# there, and each answers with a small summary.
MP_HELPERS = r"""
from binascii import unhexlify as _u
from paytoken import noise
NoiseError = noise.NoiseError
HS = noise.HandshakeState


def refuses(obj, calls):
    # Every call raises NoiseError: a state that failed once stays unusable.
    for name, args in calls:
        try:
            getattr(obj, name)(*args)
        except NoiseError:
            continue
        return False
    return True


def hs_refuses(hs, msg):
    return refuses(hs, (("read_message", (msg,)), ("write_message", (b"",)), ("split", ())))


def cs_refuses(cs, msg):
    return refuses(cs, (("decrypt_with_ad", (b"", msg)), ("encrypt_with_ad", (b"", b"x")),
                        ("has_key", ()), ("set_nonce", (0,)), ("rekey", ())))


def flipped(msg, pos):
    m = bytearray(msg)
    m[pos] ^= 1 << (pos & 7)
    return bytes(m)


def tamper_msg1(s, s_pub, ei, payload):
    # (control payload, length, positions whose flip was accepted or left the responder usable)
    m1 = HS("NK", True, rs=s_pub, e=ei).write_message(payload)
    control = HS("NK", False, s=s, s_pub=s_pub).read_message(m1)
    bad = []
    for pos in range(len(m1)):
        r = HS("NK", False, s=s, s_pub=s_pub)
        try:
            r.read_message(flipped(m1, pos))
            bad.append(pos)
        except NoiseError:
            if not hs_refuses(r, m1):
                bad.append(pos)
    return control, len(m1), bad


def tamper_msg2(s, s_pub, ei, payload):
    # msg1 is deterministic for a fixed ei, so each trial rebuilds the initiator that awaits msg2.
    i = HS("NK", True, rs=s_pub, e=ei)
    r = HS("NK", False, s=s, s_pub=s_pub)
    r.read_message(i.write_message(b""))
    m2 = r.write_message(payload)
    control = i.read_message(m2)
    bad = []
    for pos in range(len(m2)):
        i = HS("NK", True, rs=s_pub, e=ei)
        i.write_message(b"")
        try:
            i.read_message(flipped(m2, pos))
            bad.append(pos)
        except NoiseError:
            if not hs_refuses(i, m2):
                bad.append(pos)
    return control, len(m2), bad


def nk_session(s, s_pub, ei, er):
    i = HS("NK", True, rs=s_pub, e=ei)
    r = HS("NK", False, s=s, s_pub=s_pub, e=er)
    r.read_message(i.write_message(b""))
    i.read_message(r.write_message(b""))
    return i.split(), r.split()


def tamper_transport(s, s_pub, ei, er, payload, to_responder):
    # Fixed ephemerals give the same transport keys in every trial session.
    (i1, i2), (r1, r2) = nk_session(s, s_pub, ei, er)
    ct = (i1 if to_responder else r2).encrypt_with_ad(b"", payload)
    control = (r1 if to_responder else i2).decrypt_with_ad(b"", ct)
    bad = []
    for pos in range(len(ct)):
        (i1, i2), (r1, r2) = nk_session(s, s_pub, ei, er)
        rx = r1 if to_responder else i2
        try:
            rx.decrypt_with_ad(b"", flipped(ct, pos))
            bad.append(pos)
        except NoiseError:
            if not cs_refuses(rx, ct):
                bad.append(pos)
    return control, len(ct), bad
"""


@pytest.fixture
def helpers(mp):
    mp.exec(MP_HELPERS)
    return mp


def _lit(v) -> str:
    """A MicroPython expression for v; bytes go as hex (half the size of a repr)."""
    return f"_u('{v.hex()}')" if isinstance(v, bytes) else repr(v)


def ns_call(mp, fn: str, *args):
    """Call a function defined by MP_HELPERS (the harness's call() resolves module paths only)."""
    return mp.eval(f"{fn}({', '.join(_lit(a) for a in args)})")


def pub(priv: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def keys_needed(pattern: str) -> tuple[bool, bool, bool, bool]:
    """(initiator has s, responder has s, initiator knows rs, responder knows rs) by section 7.4/7.5."""
    if len(pattern) == 1:  # one-way: the sender's letter only; the recipient's s is always known
        return pattern != "N", True, True, pattern == "K"
    return pattern[0] != "N", pattern[1] != "N", pattern[1] == "K", pattern[0] == "K"


class Fw:
    """A paytoken.noise.HandshakeState kept alive in the MicroPython process."""

    count = 0

    def __init__(self, mp, pattern: str, initiator: bool, prologue=b"", s=None, rs=None, e=None):
        Fw.count += 1
        self.mp, self.v, self.initiator = mp, f"_hs{Fw.count}", initiator
        args = f"prologue={_lit(prologue)}, s={_lit(s)}, rs={_lit(rs)}, e={_lit(e)}"
        mp.exec(f"{self.v} = HS({pattern!r}, {initiator}, {args})")

    def write(self, payload: bytes = b"") -> bytes:
        return self.mp.eval(f"{self.v}.write_message({_lit(payload)})")

    def read(self, msg: bytes) -> bytes:
        return self.mp.eval(f"{self.v}.read_message({_lit(msg)})")

    def get(self, attr: str):
        return self.mp.eval(f"{self.v}.{attr}")

    @property
    def finished(self) -> bool:
        return self.get("finished")

    @property
    def h(self) -> bytes:
        return self.get("h")

    def split(self) -> None:
        v = self.v
        tx, rx = ("c1", "c2") if self.initiator else ("c2", "c1")  # c1 carries initiator -> responder
        self.mp.exec(f"{v}_c1, {v}_c2, {v}_hh = {v}.split(with_h=True)\n{v}_tx, {v}_rx = {v}_{tx}, {v}_{rx}")
        assert self.mp.eval(f"{v}_hh") == self.h

    def send(self, pt: bytes) -> bytes:
        return self.mp.eval(f"{self.v}_tx.encrypt_with_ad(b'', {_lit(pt)})")

    def recv(self, ct: bytes) -> bytes:
        return self.mp.eval(f"{self.v}_rx.decrypt_with_ad(b'', {_lit(ct)})")

    def close(self) -> None:
        v = self.v
        self.mp.exec(f"{v} = {v}_c1 = {v}_c2 = {v}_hh = {v}_tx = {v}_rx = None")


class Ref:
    """The same interface over noiseprotocol's NoiseConnection (CPython, cryptography)."""

    def __init__(self, pattern: str, initiator: bool, prologue=b"", s=None, rs=None, e=None):
        c = self.c = NoiseConnection.from_name(f"Noise_{pattern}{SUITE}".encode())
        c.set_as_initiator() if initiator else c.set_as_responder()
        c.set_prologue(prologue)
        for kind, key in ((Keypair.STATIC, s), (Keypair.EPHEMERAL, e)):
            if key is not None:
                c.set_keypair_from_private_bytes(kind, key)
        if rs is not None:
            c.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, rs)
        c.start_handshake()

    def write(self, payload: bytes = b"") -> bytes:
        return bytes(self.c.write_message(payload))

    def read(self, msg: bytes) -> bytes:
        return bytes(self.c.read_message(msg))

    @property
    def finished(self) -> bool:
        return self.c.handshake_finished

    @property
    def h(self) -> bytes:
        return self.c.get_handshake_hash()

    def split(self) -> None:
        pass  # NoiseConnection splits by itself

    def send(self, pt: bytes) -> bytes:
        return self.c.encrypt(pt)

    def recv(self, ct: bytes) -> bytes:
        return bytes(self.c.decrypt(ct))


@pytest.fixture
def fw(helpers):
    made: list[Fw] = []

    def make(*args, **kwargs) -> Fw:
        made.append(Fw(helpers, *args, **kwargs))
        return made[-1]

    yield make
    for f in made:
        f.close()


def noise_error(fn, *args, **kwargs) -> MicroPythonError:
    with pytest.raises(MicroPythonError) as exc:
        fn(*args, **kwargs)
    assert exc.value.kind == "NoiseError", exc.value
    return exc.value


def run(ini, resp, payloads, one_way: bool) -> list[bytes]:
    """Handshake, then transport messages, alternating direction (one-way: initiator only) as in
    cacophony; checks every payload arrives and returns the messages."""
    msgs = []
    for j, payload in enumerate(payloads):
        tx, rx = (ini, resp) if one_way or j % 2 == 0 else (resp, ini)
        if not tx.finished:
            msg = tx.write(payload)
            assert rx.read(msg) == payload, j
            if tx.finished:
                assert rx.finished
                ini.split()
                resp.split()
        else:
            msg = tx.send(payload)
            assert rx.recv(msg) == payload, j
        msgs.append(msg)
    assert ini.finished and resp.finished
    return msgs


def session_keys(pattern: str, si: bytes, sr: bytes, prologue: bytes, ei=None, er=None):
    """Keyword arguments for initiator and responder: each gets what the pattern says it has."""
    has_si, has_sr, i_knows, r_knows = keys_needed(pattern)
    ini = {"prologue": prologue, "s": si if has_si else None, "rs": pub(sr) if i_knows else None, "e": ei}
    resp = {"prologue": prologue, "s": sr if has_sr else None, "rs": pub(si) if r_knows else None, "e": er}
    return ini, resp


# ---- published vectors ----


@pytest.mark.parametrize("pattern", PATTERNS)
def test_cacophony_vectors(fw, pattern):
    hh, *cts = VECTORS[pattern]
    ikw, rkw = session_keys(pattern, VEC_INIT_STATIC, VEC_RESP_STATIC, VEC_PROLOGUE)
    assert ikw["rs"] in (None, VEC_INIT_REMOTE_STATIC) and rkw["rs"] in (None, VEC_RESP_REMOTE_STATIC)
    ini = fw(pattern, True, **dict(ikw, e=VEC_INIT_EPHEMERAL))
    resp = fw(pattern, False, **dict(rkw, e=VEC_RESP_EPHEMERAL))
    msgs = run(ini, resp, VEC_PAYLOADS, len(pattern) == 1)
    assert [m.hex() for m in msgs] == list(cts)
    assert ini.h == resp.h == bytes.fromhex(hh)


@pytest.mark.filterwarnings("ignore:One of ephemeral keypairs is already set")
@pytest.mark.parametrize("pattern", PATTERNS)
def test_noiseprotocol_reproduces_vectors(pattern):
    # The reference the interop tests trust, checked against the same published vectors.
    hh, *cts = VECTORS[pattern]
    ikw, rkw = session_keys(pattern, VEC_INIT_STATIC, VEC_RESP_STATIC, VEC_PROLOGUE)
    ini = Ref(pattern, True, **dict(ikw, e=VEC_INIT_EPHEMERAL))
    resp = Ref(pattern, False, **dict(rkw, e=VEC_RESP_EPHEMERAL if len(pattern) == 2 else None))
    assert [m.hex() for m in run(ini, resp, VEC_PAYLOADS, len(pattern) == 1)] == list(cts)
    assert ini.h == resp.h == bytes.fromhex(hh)


@pytest.mark.filterwarnings("ignore:One of ephemeral keypairs is already set")
@pytest.mark.parametrize("pattern", ["NK", "XX", "IK", "KK", "N"])
def test_fixed_ephemeral_transcripts_match_noiseprotocol(fw, pattern):
    # Fresh random keys, prologue and payloads: noiseprotocol's transcript is the vector.
    si, sr, ei, er = (os.urandom(32) for _ in range(4))
    prologue = os.urandom(40)
    payloads = [os.urandom(n) for n in (0, 17, 1, 100, 0, 33)]
    ikw, rkw = session_keys(pattern, si, sr, prologue, ei, er if len(pattern) == 2 else None)
    ref = run(Ref(pattern, True, **ikw), Ref(pattern, False, **rkw), payloads, len(pattern) == 1)
    ini, resp = fw(pattern, True, **ikw), fw(pattern, False, **rkw)
    assert run(ini, resp, payloads, len(pattern) == 1) == ref


# ---- interop ----


@pytest.mark.parametrize(
    "prologue", [b"", b"paytoken-qr:v1|shop 7|amount 1250|nonce 8f3a"], ids=["no-prologue", "prologue"]
)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("fw_role", ["initiator", "responder"])
def test_interop_with_noiseprotocol(fw, fw_role, pattern, prologue):
    si, sr = os.urandom(32), os.urandom(32)
    ikw, rkw = session_keys(pattern, si, sr, prologue)
    if fw_role == "initiator":
        ini, resp = fw(pattern, True, **ikw), Ref(pattern, False, **rkw)
        mine, peer_s = ini, sr
    else:
        ini, resp = Ref(pattern, True, **ikw), fw(pattern, False, **rkw)
        mine, peer_s = resp, si
    payloads = [b"pay 1250 to shop 7", b"receipt " + os.urandom(24)]
    payloads += [os.urandom(n) for n in (0, 1, 15, 16, 17, 300, 1000, 5, 0, 64)]
    run(ini, resp, payloads, len(pattern) == 1)
    assert ini.h == resp.h
    has_si, has_sr, _, _ = keys_needed(pattern)
    if has_sr if fw_role == "initiator" else has_si:
        assert mine.get("rs") == pub(peer_s)  # the peer's static key, pinned or received


# ---- failures ----


def test_tampered_msg1_rejected(helpers):
    s = os.urandom(32)
    payload = b"pay 1250"
    control, n, bad = ns_call(helpers, "tamper_msg1", s, pub(s), os.urandom(32), payload)
    assert control == payload and n == 32 + len(payload) + 16
    assert bad == []


def test_tampered_msg2_rejected(helpers):
    s = os.urandom(32)
    payload = b"receipt 42"
    control, n, bad = ns_call(helpers, "tamper_msg2", s, pub(s), os.urandom(32), payload)
    assert control == payload and n == 32 + len(payload) + 16
    assert bad == []


@pytest.mark.parametrize("to_responder", [True, False], ids=["payer-to-payee", "payee-to-payer"])
def test_tampered_transport_rejected(helpers, to_responder):
    s = os.urandom(32)
    payload = b"token 0001"
    args = (s, pub(s), os.urandom(32), os.urandom(32), payload, to_responder)
    control, n, bad = ns_call(helpers, "tamper_transport", *args)
    assert control == payload and n == len(payload) + 16
    assert bad == []


def test_wrong_responder_key_fails_at_responder(fw):
    # The payer scanned a QR code with another key: the payee's read of msg1 fails, no payload.
    s, wrong = os.urandom(32), os.urandom(32)
    qr = b"paytoken-qr:v1|shop 7"
    payer = fw("NK", True, prologue=qr, rs=pub(wrong))
    payee = fw("NK", False, prologue=qr, s=s)
    m1 = payer.write(b"pay 1250 to shop 7")
    noise_error(payee.read, m1)
    noise_error(payee.write)
    noise_error(payee.read, m1)
    # The holder of the key the payer did use reads it: the failure is the key, not the message.
    assert fw("NK", False, prologue=qr, s=wrong).read(m1) == b"pay 1250 to shop 7"


def test_low_order_ephemeral_rejected(fw):
    # An all-zero DH result (a small-order re) would key the session with a value the attacker
    # knows: x25519 refuses it, and the handshake fails with NoiseError.
    s = os.urandom(32)
    payee = fw("NK", False, s=s)
    err = noise_error(payee.read, bytes(32 + 16))
    assert "all-zero" in err.msg
    noise_error(payee.write)


@pytest.mark.parametrize("pattern", ["NK", "NN"])
@pytest.mark.parametrize("odd_side", ["initiator", "responder"])
def test_prologue_mismatch_fails(fw, pattern, odd_side):
    s = os.urandom(32)
    good, other = b"paytoken-qr:v1|amount 1250", b"paytoken-qr:v1|amount 9250"
    ikw = {"prologue": other if odd_side == "initiator" else good}
    rkw = {"prologue": other if odd_side == "responder" else good}
    if pattern == "NK":
        ikw["rs"], rkw["s"] = pub(s), s
    ini, resp = fw(pattern, True, **ikw), fw(pattern, False, **rkw)
    m1 = ini.write(b"hello")
    if pattern == "NK":
        noise_error(resp.read, m1)  # msg1 is encrypted under a key bound to h, which covers the prologue
        return
    assert resp.read(m1) == b"hello"  # NN's msg1 has no key yet: the mismatch shows at msg2
    noise_error(ini.read, resp.write(b"world"))
    noise_error(ini.write)


def test_replayed_msg1_gives_replayer_nothing(fw):
    s = os.urandom(32)
    qr = b"paytoken-qr:v1|shop 7|challenge 5c1d"
    payer = fw("NK", True, prologue=qr, rs=pub(s))
    payee = fw("NK", False, prologue=qr, s=s)
    m1 = payer.write(b"pay 1250")
    assert payee.read(m1) == b"pay 1250"
    m2 = payee.write(b"receipt")
    assert payer.read(m2) == b"receipt"
    payer.split()
    payee.split()
    t1 = payer.send(b"token 0001")
    assert payee.recv(t1) == b"token 0001"

    # Replayed to a new session of the same payee, msg1 is accepted again: NK's first message
    # carries no freshness, so the payment protocol must not act on msg1 alone.
    payee2 = fw("NK", False, prologue=qr, s=s)
    assert payee2.read(m1) == b"pay 1250"
    m2b = payee2.write(b"receipt")
    assert m2b[:32] != m2[:32]  # a fresh responder ephemeral: new keys
    # Without the payer's ephemeral private key nobody reads m2b: an initiator of the replayer's
    # own (same rs and prologue) fails, and the payer's finished handshake takes no more messages.
    replayer = fw("NK", True, prologue=qr, rs=pub(s))
    replayer.write(b"pay 1250")
    noise_error(replayer.read, m2b)
    noise_error(payer.read, m2b)
    # The two sessions' channels are disjoint: nothing recorded crosses from one to the other.
    payee2.split()
    noise_error(payee2.recv, t1)
    noise_error(payer.recv, payee2.send(b"receipt 2"))


def test_out_of_turn_calls_raise(fw):
    s = os.urandom(32)
    ini = fw("NK", True, rs=pub(s))
    noise_error(ini.read, b"\x00" * 48)  # the initiator speaks first
    noise_error(ini.write)  # and the failure ended the session
    resp = fw("NK", False, s=s)
    noise_error(resp.write)  # the responder listens first
    noise_error(resp.get, "split()")  # not finished

    ini, resp = fw("NK", True, rs=pub(s)), fw("NK", False, s=s)
    m1 = ini.write()
    noise_error(ini.write)  # two in a row
    noise_error(ini.read, m1)  # dead since the previous call

    ini, resp = fw("NK", True, rs=pub(s)), fw("NK", False, s=s)
    resp.read(ini.write())
    ini.read(resp.write())
    assert ini.finished and resp.finished
    ini.split()
    noise_error(ini.write)  # the handshake is over
    noise_error(ini.get, "split()")
    assert ini.send(b"still fine") != b""  # the transport ciphers live on their own


def test_transport_replay_and_reorder_rejected(fw):
    s = os.urandom(32)
    ini, resp = fw("NK", True, rs=pub(s)), fw("NK", False, s=s)
    resp.read(ini.write())
    ini.read(resp.write())
    ini.split()
    resp.split()
    a, b = ini.send(b"first"), ini.send(b"second")
    noise_error(resp.recv, b)  # out of order: nonce 0 expected
    noise_error(resp.recv, a)  # and the channel is closed

    ini2, resp2 = fw("NK", True, rs=pub(s)), fw("NK", False, s=s)
    resp2.read(ini2.write())
    ini2.read(resp2.write())
    ini2.split()
    resp2.split()
    a = ini2.send(b"first")
    assert resp2.recv(a) == b"first"
    noise_error(resp2.recv, a)  # replayed


@pytest.mark.parametrize(
    "pattern, initiator, kwargs",
    [
        ("NK", True, {}),  # no rs
        ("NK", False, {}),  # no s
        ("XX", True, {}),  # no s
        ("XX", False, {"s": b"\x01" * 32, "rs": b"\x02" * 32}),  # rs would be replaced by the sent one
        ("NK", True, {"rs": b"\x02" * 31}),
        ("NK", False, {"s": b"\x01" * 33}),
        ("NK", True, {"rs": b"\x02" * 32, "e": b"\x03" * 16}),
        ("NKpsk0", True, {"rs": b"\x02" * 32}),
        ("ZZ", True, {}),
        ("", True, {}),
        ("N:", True, {"rs": b"\x02" * 32}),
    ],
)
def test_bad_setup_rejected(fw, pattern, initiator, kwargs):
    noise_error(fw, pattern, initiator, **kwargs)


def test_size_limits(helpers):
    # 64 KB messages are built and checked inside MicroPython: as hex in JSON they would not fit.
    s = os.urandom(32)
    ini = f"HS('NK', True, rs={_lit(pub(s))})"
    resp = f"HS('NK', False, s={_lit(s)})"
    helpers.exec(f"_big = bytes(range(256)) * 256\n_i = {ini}\n_r = {resp}")
    noise_error(helpers.eval, f"{ini}.write_message(_big[:{MAX_MESSAGE - 48 + 1}])")  # msg1 of 65536
    noise_error(helpers.eval, f"{resp}.read_message(bytes({MAX_MESSAGE + 1}))")
    noise_error(helpers.eval, f"{resp}.read_message(bytes(47))")  # shorter than e and a tag
    # The largest messages pass: msg1 with a 65487-byte payload, a 65519-byte transport payload.
    helpers.exec(f"_m = _i.write_message(_big[:{MAX_MESSAGE - 48}])")
    assert helpers.eval("len(_m)") == MAX_MESSAGE
    assert helpers.eval(f"_r.read_message(_m) == _big[:{MAX_MESSAGE - 48}]")
    helpers.exec("_i.read_message(_r.write_message(b''))\n_tx = _i.split()[0]\n_rx = _r.split()[0]")
    helpers.exec(f"_m = _tx.encrypt_with_ad(b'', _big[:{MAX_MESSAGE - 16}])")
    assert helpers.eval("len(_m)") == MAX_MESSAGE
    assert helpers.eval(f"_rx.decrypt_with_ad(b'', _m) == _big[:{MAX_MESSAGE - 16}]")
    noise_error(helpers.eval, "_rx.decrypt_with_ad(b'', bytes(15))")  # shorter than a tag
    noise_error(helpers.eval, f"_tx.encrypt_with_ad(b'', _big[:{MAX_MESSAGE - 15}])")
    helpers.exec("_big = _m = _i = _r = _tx = _rx = None")


def test_cipherstate_nonces_match_aesgcm(helpers):
    # Section 5.1 and 12.3: ENCRYPT(k, n, ad, p) is AES-256-GCM with nonce 0^32 || n (64-bit BE).
    k = os.urandom(32)
    helpers.exec(f"_k = {_lit(k)}")
    for n in (0, 1, 255, 2**32, 2**63, 2**64 - 2):
        nonce = bytes(4) + n.to_bytes(8, "big")
        helpers.exec(f"_cs = noise.CipherState(_k)\n_cs.set_nonce({n})")
        ct = helpers.eval("_cs.encrypt_with_ad(b'ad', b'payment')")
        assert ct == AESGCM(k).encrypt(nonce, b"payment", b"ad"), n
        assert helpers.eval("_cs.n") == n + 1
        helpers.exec(f"_cs = noise.CipherState(_k)\n_cs.set_nonce({n})")
        assert helpers.eval(f"_cs.decrypt_with_ad(b'ad', {_lit(ct)})") == b"payment"
    assert helpers.eval("noise.CipherState().encrypt_with_ad(b'ad', b'plain')") == b"plain"  # no key yet


def test_cipherstate_nonce_exhaustion(helpers):
    k = os.urandom(32)
    helpers.exec(f"_cs = noise.CipherState({_lit(k)})\n_cs.set_nonce({2**64 - 2})")
    last = helpers.eval("_cs.encrypt_with_ad(b'', b'last')")
    assert last == AESGCM(k).encrypt(bytes(4) + b"\xff" * 7 + b"\xfe", b"last", b"")
    noise_error(helpers.eval, "_cs.encrypt_with_ad(b'', b'one more')")  # n = 2^64-1 is reserved
    assert helpers.eval("cs_refuses(_cs, b'')")
    helpers.exec(f"_cs = noise.CipherState({_lit(k)})\n_cs.set_nonce({2**64 - 1})")
    noise_error(helpers.eval, f"_cs.decrypt_with_ad(b'', {_lit(last)})")


def test_cipherstate_rekey(helpers):
    # Section 4.2: REKEY(k) = first 32 bytes of ENCRYPT(k, 2^64-1, empty, 32 zero bytes); n stays.
    k = os.urandom(32)
    k2 = AESGCM(k).encrypt(bytes(4) + b"\xff" * 8, bytes(32), b"")[:32]
    helpers.exec(f"_cs = noise.CipherState({_lit(k)})\n_cs.set_nonce(5)\n_cs.rekey()")
    assert helpers.eval("_cs.n") == 5
    ct = helpers.eval("_cs.encrypt_with_ad(b'ad', b'after rekey')")
    assert ct == AESGCM(k2).encrypt(bytes(4) + (5).to_bytes(8, "big"), b"after rekey", b"ad")


# ---- RAM ----

NK_SESSION = """
from paytoken import noise
from paytoken.crypto import x25519
s = b"\\x07" * 32
i = noise.HandshakeState("NK", True, prologue=b"paytoken-qr:v1|shop 7", rs=x25519.public_key(s))
r = noise.HandshakeState("NK", False, prologue=b"paytoken-qr:v1|shop 7", s=s)
p = r.read_message(i.write_message(b"pay 1250 to shop 7"))
q = i.read_message(r.write_message(b"receipt"))
ci1, ci2 = i.split()
cr1, cr2 = r.split()
a = cr1.decrypt_with_ad(b"", ci1.encrypt_with_ad(b"", b"t" * 200))
b = ci2.decrypt_with_ad(b"", cr2.encrypt_with_ad(b"", b"r" * 200))
print(p == b"pay 1250 to shop 7" and q == b"receipt" and a == b"t" * 200 and b == b"r" * 200 and i.h == r.h)
"""


def test_nk_session_fits_48k_heap():
    # Both parties in one process, modules loaded into the heap: a device's budget for this is less.
    proc = run_script(NK_SESSION, heapsize="48K")
    assert proc.returncode == 0, proc.stdout + proc.stderr  # -c prints tracebacks to stdout
    assert proc.stdout.strip() == "True"
