# Start-up after the self-test (main.py): the board's display, the device store, the wallet, the radio, and
# the app the certificate's role asks for.
#
#   run(board, make_transport=None, sessions=None, out=None)
#       board: the board module (display(), buttons(cb), scanner(), storage()); make_transport(app) gives the
#       app's transport (default: transport() below); sessions and out go to the app (tests, the demo).
#       Returns the app after it stopped, or None when the device cannot pay: an unprovisioned or damaged
#       store, or no radio; then the screen says why. An unprovisioned device whose board has a USB serial
#       link (board.usb(), None without one) runs the provisioning service on it instead
#       (paytoken.provisioning); after finalise it resets the board (usb.reset(); the simulator's process
#       ends and "restart" is returned), which then boots into its app. A provisioned device enters the same
#       service when asked at power-on (usb.service_requested(): a button held), where it answers IDENTIFY only.
#   open_device(root) -> (store.Device, Trust, Wallet); StoreError when the store is incomplete or wrong.
#   transport(app)    the BLE transport from paytoken.ble (its own module), None when the build has none.
#   While the app runs, a board with a USB serial link has its port watched for a sync relay
#   (paytoken.app.usbwatch: sync over USB between payments, nothing of it loaded while paying).
import asyncio
import sys

from paytoken import store
from paytoken.app.io import Keys, Log, Screen
from paytoken.reasons import Refused


def forget(name):
    # Unload a module that has done its job (the self-test): its code leaves the heap at the next collection.
    sys.modules.pop(name, None)
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        try:
            delattr(sys.modules[parent], child)
        except (AttributeError, KeyError):  # MicroPython: KeyError for a module attribute that is not there
            pass


def transport(app):
    # paytoken.ble provides payee_transport() (for the terminal) and payer_transport() (for the card);
    # see docs/architecture.md, "Transport". Imported only here, so a build without it still starts.
    try:
        from paytoken import ble
    except ImportError as e:
        print("paytoken: no BLE transport (%s)" % e)
        return None
    try:
        return ble.payee_transport() if app == "terminal" else ble.payer_transport()
    except OSError as e:  # the radio does not come up (the simulator without a broker: ENODEV)
        print("paytoken: no radio (%s)" % e)
        return None


def open_device(root):
    from paytoken.trust import Trust
    from paytoken.wallet import Wallet

    dev = store.load(root)
    trust = Trust(dev.issuer_pub, dev.backend_pub)
    try:
        trust.check_cert(dev.cert_raw, dev.cert.role)  # the issuer's signature, the role (no clock yet)
    except Refused as r:
        raise store.StoreError(store.MISMATCH, "cert.bin", str(r))
    return dev, trust, Wallet(dev.ledger_path, dev.identity_priv, dev.cert_raw, trust)


def build(board, dev, trust, wallet, transport, screen, out=None):
    log = Log(dev.name, out)
    if dev.app == "terminal":
        from paytoken.app.terminal import Terminal

        qr_amount = dev.config.get("qr_amount", screen.display.height >= 120)  # a version-4 QR fits
        return Terminal(wallet, trust, dev.static_priv, dev.static_pub, transport, screen, log,
                        dev.config.get("amount"), qr_amount, Keys(board.buttons), dev.backend_kx, dev.name)
    from paytoken.app.card import Card

    return Card(wallet, trust, transport, screen, Keys(board.buttons), board.scanner(), log, dev.backend_kx,
                dev.name)


def usb_service(usb, root, screen, log):
    # The USB serial service (provisioning) on the board's USB link; None when the board has none.
    if usb is None:
        return None
    from paytoken import provisioning

    log("EVENT device provisioning usb=ready")
    screen.show("unprovisioned", "USB service: provisioning")
    why = provisioning.serve(root, usb.port(), usb.chip, usb.rng_entropy)
    log("EVENT device provisioning end=%s" % why)
    if why == "restart":
        usb.reset()
    return why


def run(board, make_transport=None, sessions=None, out=None):
    screen = Screen(board.display())
    log = out or print
    usb = board.usb() if hasattr(board, "usb") else None
    try:
        root = board.storage()
        if usb is not None and usb.service_requested():
            return usb_service(usb, root, screen, log)
        dev, trust, wallet = open_device(root)
    except store.StoreError as e:
        log("EVENT device halted why=unprovisioned file=%s kind=%s" % (e.name, e.kind))
        screen.show("unprovisioned", str(e))
        return usb_service(usb, root, screen, log)
    except OSError as e:  # no filesystem to read the store from
        log("EVENT device halted why=storage")
        screen.show("unprovisioned", "storage: " + str(e))
        return None
    port = usb_port(usb, log, dev.name)
    usb = None
    forget("paytoken.drivers.esp32_usb")  # nothing of the USB service stays on the payment path
    t = (make_transport or transport)(dev.app)
    if t is None:
        log("EVENT %s halted why=transport" % dev.name)
        screen.show("unprovisioned", "no BLE transport in this build")
        return None
    app = build(board, dev, trust, wallet, t, screen, out)
    asyncio.run(_main(app, sessions, port, wallet, dev, screen, Log(dev.name, out), board))
    return app


def finalised(board):
    # True when the device's store holds the provisioning lock: it must then never reach the REPL.
    try:
        return store.exists(store.path(board.storage(), "store", store.FINAL))
    except OSError:
        return False


def usb_port(usb, log, name):
    # The USB serial port the app watches for a sync relay (paytoken.app.usbwatch); None without one.
    if usb is None:
        return None
    try:
        return usb.port()
    except OSError as e:  # the simulator's bridge is not there
        log("EVENT %s usb port=none why=%s" % (name, e))
        return None


async def _main(app, sessions, port, wallet, dev, screen, log, board=None):
    tasks = []
    if port is not None and dev.backend_kx is not None:
        from paytoken.app.usbwatch import UsbWatch

        tasks.append(asyncio.create_task(UsbWatch(port, app, wallet, dev.backend_kx, screen, log).run()))
    every = dev.config.get("sync_every_s")
    if every and dev.backend_kx is not None and board is not None and hasattr(board, "network"):
        # a device with Wi-Fi syncs itself on this schedule (paytoken.app.wifisync, loaded only to sync)
        from paytoken.app import wifisync

        tasks.append(asyncio.create_task(wifisync.every(board, app, dev, wallet, screen, log, every)))
    try:
        await app.run(sessions)
    finally:
        for t in tasks:
            t.cancel()
