# paytoken's BLE transport (docs/protocol.md section 9):
#   gatt        service UUIDs, advertising payload, control frames (no `bluetooth` import: host tools use it)
#   irq         the one BLE IRQ dispatcher both roles share
#   conn        BleLink: one BLE connection as a paytoken Link
#   peripheral  the payee: Peripheral(ble, name)
#   central     the payer: await connect(ble, addr_type, addr, nonce, timeout_ms)
#
# The apps take a transport object: payee_transport() (address, start, accept, stop: a Peripheral) or
# payer_transport() (connect). Both give None on a build without `bluetooth` or when the radio does not come
# up (the start-up then halts with why=transport). Only the role's own module is imported, so a payer never
# loads the payee's code and the other way round.
try:
    import bluetooth
except ImportError:
    bluetooth = None


def _radio():
    if bluetooth is None:
        return None
    ble = bluetooth.BLE()
    try:
        if not ble.active():
            ble.active(True)
    except OSError as e:
        print("paytoken: the BLE radio does not start (%s)" % e)
        return None
    return ble


def payee_transport(name=None):
    """The payee's Peripheral on this device's radio, named `name` or "paytoken-" and its address's last
    two bytes in hex; None without a radio."""
    ble = _radio()
    if ble is None:
        return None
    from paytoken.ble.peripheral import Peripheral

    if name is None:
        addr = ble.config("mac")[1]
        name = "paytoken-%02x%02x" % (addr[-2], addr[-1])
    return Peripheral(ble, name)


class Payer:
    # The payer's transport: await connect(addr_type, addr, nonce, timeout_ms) -> Link (see central.connect).
    # The central's code and buffers are made here, at start-up, not in the middle of a payment: long-lived
    # objects allocated between a payment's short-lived ones would split the heap's free space for good.
    def __init__(self, ble):
        from paytoken.ble import central

        self.ble = ble
        self._connect = central.connect
        central.prepare(ble)

    async def connect(self, addr_type, addr, nonce, timeout_ms):
        return await self._connect(self.ble, addr_type, addr, nonce, timeout_ms)


def payer_transport():
    """The payer's transport on this device's radio; None without a radio."""
    ble = _radio()
    return None if ble is None else Payer(ble)
