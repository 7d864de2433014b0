# The one BLE IRQ handler: `bluetooth` keeps a single handler per BLE object, and a device may run the payee
# (GATT server, peripheral.py) and the payer (GATT client, central.py) on one radio. Each event goes to the
# role it belongs to; connection-level events (MTU, connection update) to the role that owns the handle.
#
# A role handler is an object with `_irq(event, data)`, `owns(conn_handle)` and `_irq_failed(exc)`. Handlers
# run in the BLE stack's context (on an ESP32 the NimBLE task): they copy what they keep out of the
# memoryviews in `data`, update a few fields and set asyncio.ThreadSafeFlag objects, nothing more.
# Nothing may escape a handler: MicroPython disables the BLE IRQ for good after an uncaught exception.
from micropython import const

_IRQ_CENTRAL_CONNECT = const(1)
_IRQ_GATTS_READ_REQUEST = const(4)
_IRQ_SCAN_RESULT = const(5)
_IRQ_GATTC_INDICATE = const(19)
_IRQ_GATTS_INDICATE_DONE = const(20)
_IRQ_MTU_EXCHANGED = const(21)
_IRQ_CONNECTION_UPDATE = const(27)


class Dispatcher:
    def __init__(self, ble):
        self.ble = ble
        self.peripheral = None  # the GATT server role (payee)
        self.central = None  # the GATT client role (payer)
        ble.irq(self._irq)

    def _irq(self, event, data):
        if _IRQ_CENTRAL_CONNECT <= event <= _IRQ_GATTS_READ_REQUEST or event == _IRQ_GATTS_INDICATE_DONE:
            h = self.peripheral
        elif _IRQ_SCAN_RESULT <= event <= _IRQ_GATTC_INDICATE:
            h = self.central
        elif event == _IRQ_MTU_EXCHANGED or event == _IRQ_CONNECTION_UPDATE:
            h = self.peripheral
            if h is None or not h.owns(data[0]):
                h = self.central
        else:
            return None  # pairing, L2CAP: not used
        if h is None:
            return None
        try:
            return h._irq(event, data)
        except Exception as e:  # noqa: BLE001 - see the header: the IRQ must survive
            try:
                h._irq_failed(e)
            except Exception:  # noqa: BLE001
                pass
        return None


_dispatcher = None


def dispatcher(ble):
    """The dispatcher of this BLE object, installing it as the BLE IRQ handler the first time."""
    global _dispatcher
    if _dispatcher is None or _dispatcher.ble is not ble:
        _dispatcher = Dispatcher(ble)
    return _dispatcher
