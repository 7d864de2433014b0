"""host/sync_bridge.py: relay a device's sealed sync to the settlement backend over USB serial or BLE."""

from __future__ import annotations

import argparse
import sys
import time

from paytoken_host.sync_bridge_core import EXIT_CODES, BridgeError, DeviceLink, SerialDeviceLink, describe, relay

EPILOG = """exit codes:
""" + "\n".join(f"  {code:3d}  {kind}" for kind, code in EXIT_CODES.items()) + """

The bridge trusts nothing it carries: the messages are sealed between the device and the backend (Noise NK);
it learns their sizes and the device's wake token, nothing else. Progress goes to stderr; the outcome line
("synced: ...") too. Example: python host/sync_bridge.py --port /dev/ttyUSB0 --backend http://localhost:8000 --stay
"""


def open_link(args: argparse.Namespace) -> DeviceLink:
    if args.ble:
        try:
            from paytoken_host.sync_ble import BleDeviceLink
        except ImportError as e:
            raise BridgeError("usage", f"--ble: this installation has no BLE sync transport "
                                       f"(paytoken_host.sync_ble: {e})") from None
        return BleDeviceLink(args.ble, "sim" if args.radio else "bleak", args.radio or None, args.timeout)
    return SerialDeviceLink(args.port, args.baud, args.timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sync_bridge.py", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--port", help="the device's USB serial port (default: the one ESP32 board plugged in)")
    where.add_argument("--ble", metavar="NAME|ADDRESS", help="the device over BLE (paytoken_host.sync_ble)")
    ap.add_argument("--radio", metavar="HOST:PORT", default="",
                    help="with --ble: the simulator's radio broker instead of this host's Bluetooth (tests, demo)")
    ap.add_argument("--backend", required=True, help="the backend's base URL, e.g. http://localhost:8000")
    ap.add_argument("--baud", type=int, default=115200, help="serial baud rate (default 115200)")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for the device's answer")
    ap.add_argument("--retries", type=int, default=5, help="backend retries with backoff (default 5)")
    ap.add_argument("--stay", action="store_true",
                    help="after the sync, wait for the device's news (GET /v1/wake) and sync again, until Ctrl-C; "
                         "a device that goes away is waited for")
    ap.add_argument("--wait", type=float, default=25.0, help="long-poll seconds per wake request (--stay)")
    args = ap.parse_args(argv)

    def progress(text: str) -> None:
        print(f"sync_bridge: {text}", file=sys.stderr, flush=True)

    try:
        while True:
            try:
                link = open_link(args)
                try:
                    result = relay(link, args.backend, progress, args.retries, args.stay, args.wait)
                finally:
                    link.close()
                progress(f"done: {describe(result)}")
                return 0
            except BridgeError as e:
                if not args.stay or e.kind not in ("no_answer", "port"):
                    progress(f"error: {e.message}")
                    return e.exit_code
                progress(f"{e.message}; waiting for the device")
                time.sleep(2.0)
    except KeyboardInterrupt:
        progress("interrupted")
        return EXIT_CODES["interrupted"]


if __name__ == "__main__":
    sys.exit(main())
