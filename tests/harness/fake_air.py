# Runs on MicroPython: an in-process stand-in for the BLE layer (paytoken.ble), built on paytoken.link's
# Loopback, with the transport interface the apps expect (docs/architecture.md, "Transport").
#
#   air = Air()
#   PayeeRadio(air, addr, addr_type=1)  address() / start(nonce) / await accept(timeout_ms) / stop()
#   PayerRadio(air)                     await connect(addr_type, addr, nonce, timeout_ms)
#   air.faults.append({...})            faults for the next connection: payer_drop / payee_drop (Loopback
#                                       drop_after: the link drops at that end's n-th + 1 send),
#                                       payer_stall / payee_stall (messages after the n-th are swallowed,
#                                       and so is that end's disconnect: radio silence, the peer times out)
#   air.payees[addr] = radio            who answers at an address (a wrong device, an impostor)
#
# Like the radio: a payee that is not advertising is UNREACHABLE; one serving a payer (accept() returned,
# stop() not yet called) or with a payer waiting to be accepted answers BUSY; the address type must match.
import asyncio
from time import ticks_add, ticks_diff, ticks_ms

from paytoken import link
from paytoken.link import LinkError, Loopback


class FaultyEnd(Loopback):
    def __init__(self, drop_after=None, stall_after=None):
        Loopback.__init__(self, drop_after)
        self.stall_after = stall_after
        self.swallowed = 0

    async def send(self, msg):
        if self.stall_after is not None and self.sent >= self.stall_after and not self.closed:
            self.sent += 1
            self.swallowed += 1
            return
        await Loopback.send(self, msg)

    def close(self):
        if self.swallowed:  # silent: the peer hears nothing of it either
            self.closed = True
            return
        Loopback.close(self)


class Air:
    def __init__(self):
        self.payees = {}
        self.faults = []
        self.links = []  # (payer end, payee end) of every connection made


class PayeeRadio:
    def __init__(self, air, addr, addr_type=1):
        self.air = air
        self.addr = bytes(addr)
        self.addr_type = addr_type
        air.payees[self.addr] = self
        self.nonce = None  # advertising while not None
        self.serving = None
        self.pending = []
        self.starts = 0
        self.stops = 0

    def address(self):
        return self.addr_type, self.addr

    def start(self, nonce):
        self.nonce = bytes(nonce)
        self.starts += 1

    def stop(self):
        self.nonce = None
        self.serving = None
        for end in self.pending:
            end.close()
        self.pending = []
        self.stops += 1

    async def accept(self, timeout_ms):
        deadline = ticks_add(ticks_ms(), timeout_ms)
        while not self.pending:
            if ticks_diff(deadline, ticks_ms()) <= 0:
                raise LinkError(link.TIMEOUT)
            await asyncio.sleep_ms(5)
        end = self.pending.pop(0)
        self.serving = end
        return end


class PayerRadio:
    def __init__(self, air):
        self.air = air
        self.connects = []  # (addr_type, addr, nonce) of every attempt

    async def connect(self, addr_type, addr, nonce, timeout_ms):
        self.connects.append((addr_type, bytes(addr), bytes(nonce)))
        await asyncio.sleep_ms(1)
        p = self.air.payees.get(bytes(addr))
        if p is None or p.nonce is None or p.addr_type != addr_type:
            raise LinkError(link.UNREACHABLE)
        if p.serving is not None or p.pending:
            raise LinkError(link.BUSY)
        f = self.air.faults.pop(0) if self.air.faults else {}
        a = FaultyEnd(f.get("payer_drop"), f.get("payer_stall"))
        b = FaultyEnd(f.get("payee_drop"), f.get("payee_stall"))
        a.peer, b.peer = b, a
        self.air.links.append((a, b))
        p.pending.append(b)
        return a
