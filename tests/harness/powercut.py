# Power-loss test driver, run on MicroPython: a payer and a payee, each with its wallet on its own
# emulated NOR flash (LittleFS), go through payments, receipts, top-ups, acknowledgements and
# compactions. A reference run records every device's state after every ledger append; then each cut
# run restores both flashes to the start of one operation, cuts the power at one block write of one
# device, reboots it (remount, recover) and checks it against the reference:
#   the ledger opens clean, nothing committed is lost (its sequence is at least what had been
#   committed, at most one more: the record in flight), and balance, counter, chain head and hash equal
#   the reference at that sequence, so no counter is reused and the balance equals the records.
from hashlib import sha256

import vfs

from board.flash import FlashDevice, PowerCut
from paytoken import base45, trust, wallet, wire
from paytoken.crypto import p256, rand
from paytoken.payee import PayeeSession
from paytoken.payer import PayerSession

BLOCKS = 64  # 256 KB per device: small images keep snapshots cheap


def seed(i):
    # Noise ephemeral keys from a fixed stream per operation, so a rerun of an operation writes the same
    # bytes as the reference run and states can be compared exactly.
    state = [sha256(b"powercut %d" % i).digest()]

    def random_bytes(n):
        out = b""
        while len(out) < n:
            state[0] = sha256(state[0]).digest()
            out += state[0]
        return out[:n]
    rand.random_bytes = random_bytes


class Device:
    def __init__(self, name, priv, cert, static=None):
        self.name = name
        self.mount = "/" + name
        self.priv = priv
        self.cert = cert
        self.static = static
        self.flash = FlashDevice(block_size=4096, block_count=BLOCKS, seed=1)
        vfs.VfsLfs2.mkfs(self.flash)
        self.fs = None
        self.w = None

    def boot(self, t):
        # Mount (LittleFS recovers its own state) and open the wallet (the ledger recovers and replays).
        if self.fs is not None:
            try:
                vfs.umount(self.mount)
            except Exception:
                pass
        self.fs = vfs.VfsLfs2(self.flash)
        vfs.mount(self.fs, self.mount)
        self.w = wallet.Wallet(self.mount + "/ledger", self.priv, self.cert, t)

    def state(self):
        w = self.w
        return (w.ledger.seq, w.ledger.hash, w.balance, w.counter, w.prev_hash, w.offline_spent, w.seq,
                w.voucher_counter, w.acked_seq)


class World:
    def __init__(self, issuer_pub, backend_priv, now, payer, payee, payments=16):
        self.backend_priv = backend_priv
        self.backend_pub = p256.public_key(backend_priv)
        self.issuer_pub = issuer_pub
        self.now = now
        self.a = Device("a", *payer)
        self.b = Device("b", *payee)
        self.vouchers = 0
        self.ops = self.workload(payments)

    def trust(self):
        return trust.Trust(self.issuer_pub, backend_pub=self.backend_pub, now=self.now)

    def boot_all(self):
        t = self.trust()
        self.a.boot(t)
        self.b.boot(t)

    # ---- operations ----
    def sign(self, body):
        return body + p256.sign(self.backend_priv, body)

    def voucher(self, amount):
        self.vouchers += 1
        counter = self.vouchers
        return lambda: self.a.w.apply_update(self.sign(wire.voucher_body(self.a.w.device_id, counter, amount,
                                                                          840, self.now)))

    def payment(self, amount, n, deliver_receipt=True):
        def run():
            a, b = self.a, self.b
            qr = wire.qr_payload(b.w.device_id[:4], bytes(6), False, b.static[1],
                                 bytes(((n >> 8) & 255, n & 255)) + b"nonce!")  # a fresh QR each
            ps = PayerSession(a.w, a.w.trust, base45.encode(qr))
            es = PayeeSession(b.w, b.w.trust, b.static[0], b.static[1], qr)
            ps.read_hello(es.read_hello(ps.start()))
            m4 = es.read_payment(ps.confirm(amount))
            if deliver_receipt:
                ps.read_receipt(m4)
        return run

    def ack_and_compact(self, dev):
        def run():
            w = dev.w
            seq, h = w.ledger.head
            w.apply_update(self.sign(wire.ack_body(w.device_id, seq, h, self.now)))
            w.compact()
        return run

    def workload(self, payments):
        ops = [("voucher", self.voucher(100000))]
        for k in range(1, payments + 1):
            ops.append(("pay", self.payment(100 * ((k - 1) % 12 + 1), k, deliver_receipt=k != 5)))
            if k % 4 == 0:
                ops.append(("ack-a", self.ack_and_compact(self.a)))
                ops.append(("ack-b", self.ack_and_compact(self.b)))
            if k % 6 == 0:
                ops.append(("voucher", self.voucher(5000)))
        return ops


def plan(world, runs, limit=None, modes=("drop", "tear")):
    # Every (operation, device, write) cut point, or an even spread of `limit` of them.
    points = []
    for i, run in enumerate(runs):
        for target, count in (("a", run[2]), ("b", run[3])):
            for n in range(1, count + 1):
                points.append((i, target, n))
    if limit and len(points) > limit:
        step = len(points) / limit
        points = [points[int(k * step)] for k in range(limit)]
    return [(i, t, n, modes[k % len(modes)]) for k, (i, t, n) in enumerate(points)]


def run_all(world, runs, states, points):
    # Runs the cut points; returns (cuts checked, points where no cut happened, failures (point, why)).
    cuts = nocut = 0
    failures = []
    for point in points:
        why = cut_run(world, states, runs, *point)
        if why == "ok":
            cuts += 1
        elif why == "nocut":
            nocut += 1
        else:
            failures.append((point, why))
    return cuts, nocut, failures


def reference(world):
    # Runs the workload once without cuts. Per operation: flash images before it and the write counts
    # it made; per device: its state after every append, keyed by ledger sequence.
    world.boot_all()
    runs = []
    states = {"a": {}, "b": {}}
    for dev in (world.a, world.b):
        s = dev.state()
        states[dev.name][s[0]] = s[1:]
    for name, op in world.ops:
        images = (bytes(world.a.flash.data), bytes(world.b.flash.data))
        world.boot_all()  # as every cut run does: the same files open, the same writes
        wa, wb = world.a.flash.writes, world.b.flash.writes
        seen = (world.a.w.ledger.seq, world.b.w.ledger.seq)
        seed(len(runs))
        op_states = track(world, op)
        runs.append((name, images, world.a.flash.writes - wa, world.b.flash.writes - wb, seen))
        for dev_name, s in op_states:
            states[dev_name][s[0]] = s[1:]
    return runs, states


def track(world, op):
    # Runs op, recording each device's state after each of its ledger appends.
    out = []
    originals = []
    for dev in (world.a, world.b):
        w = dev.w
        orig = w._append

        def wrapped(payload, dev=dev, orig=orig):
            seq = orig(payload)
            out.append((dev.name, dev.state()))
            return seq
        w._append = wrapped
        originals.append((w, orig))
    try:
        op()
    finally:
        for w, orig in originals:
            w._append = orig
    for dev in (world.a, world.b):  # compaction changes no state but must leave it intact
        out.append((dev.name, dev.state()))
    return out


def cut_run(world, states, runs, i, target, n, mode):
    # Restores the flashes to before operation i, cuts `target` at its n-th write during it, reboots it,
    # and returns None if every invariant holds, else a description of what broke.
    _, images, _, _, _ = runs[i]
    for dev, image in zip((world.a, world.b), images):
        dev.flash.power_on()
        dev.flash.data[:] = image
    world.boot_all()
    op = world.ops[i][1]
    seed(i)
    dev = world.a if target == "a" else world.b
    dev.flash.cut_at(n, mode)
    committed = None
    try:
        op()
    except PowerCut:
        committed = dev.w.ledger.seq
    except Exception as e:
        if dev.flash.powered():
            return "op failed without a cut: %r" % e
        committed = dev.w.ledger.seq  # the cut surfaced as another error (e.g. OSError from LittleFS)
    if committed is None:
        dev.flash.power_on()  # disarm: the operation made fewer writes this time
        return "nocut"
    dev.flash.power_on()
    try:
        dev.boot(world.trust())
    except Exception as e:
        return "reboot failed: %r" % e
    w = dev.w
    if w.ledger.corrupt is not None:
        return "ledger corrupt after the cut: %s" % w.ledger.corrupt
    s = dev.state()
    if not committed <= s[0] <= committed + 1:
        return "sequence %d after the cut, %d committed" % (s[0], committed)
    ref = states[target].get(s[0])
    if ref != s[1:]:
        return "state at sequence %d differs from the reference" % s[0]
    return "ok"
