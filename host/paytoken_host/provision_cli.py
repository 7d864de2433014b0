"""provision.py: the USB provisioning station's command line (paytoken_host.station does the work).

Turns a blank ESP32 running the paytoken firmware into a payment token: the device makes its P-256 identity key
(and a payee its X25519 key) on-chip from its hardware RNG and proves it holds it; the station issues its
certificate with the issuer key, registers it with the backend, installs the backend's keys and, for a payer,
the first load voucher, and finalises (locks) it. Only public keys ever cross the cable.

examples:
  provision.py --new-issuer-key issuer.key                 # create the issuer key file (encrypted, 0600)
  provision.py --role payee --name till-1 --amount 500 --issuer-key issuer.key --backend https://backend:8080
  provision.py --role payer --balance 10000 --issuer-key issuer.key --backend URL --batch 0 --log line.jsonl
  provision.py --port /dev/ttyUSB0 --flash ESP32_GENERIC.bin --chip esp32 --deploy build/firmware --role payer ...

environment:
  PAYTOKEN_KEY_PASSPHRASE       the issuer key file's passphrase (else asked on the terminal)
  PAYTOKEN_PROVISIONING_TOKEN   the backend's operator token with the provisioning role (registers devices)
  PAYTOKEN_TREASURY_TOKEN       the backend's operator token with the treasury role (the payer's first load)

output: progress on stderr; one line per device on stdout ("provisioned payer <id> cert serial <n> balance <b>");
--log appends one JSON line per device provisioned (time, operator, device_id, role, public keys, certificate
and its serial, firmware hash, chip, balance, seconds, serial_bytes) and one per failure (device, kind, error).

exit codes (per failure kind; in batch mode that of the first failure):
  0 ok, 2 usage, 3 port (none, several, does not open), 4 no_answer (the device stopped answering),
  5 device (refused a step: tampered certificate, wrong state, storage), 6 proof (proof of key possession
  fails), 7 locked (already provisioned and finalised: a full wipe is needed), 8 issuer (the device or the
  backend belongs to another issuer), 9 backend (refused or unreachable), 10 flash (esptool or mpremote),
  11 key (issuer key file), 12 firmware (not the build given with --firmware)

A run cut anywhere (power, cable, Ctrl-C) is simply run again on the same device: it resumes. A finalised device
answers only IDENTIFY; to provision it again, wipe it: --flash (esptool erases the whole flash first).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from pathlib import Path

from paytoken import wire
from paytoken_host import protocol
from paytoken_host.station import (
    FLASH_OFFSET,
    ROLES,
    Backend,
    SerialLink,
    Spec,
    Station,
    StationError,
    append_log,
    choose_port,
    deploy_firmware,
    flash_micropython,
    load_issuer_key,
)

PASSPHRASE_ENV = "PAYTOKEN_KEY_PASSPHRASE"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="provision.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("the board")
    g.add_argument("--port", help="serial port (default: the one board found by USB VID:PID: CP210x, CH340/CH9102, "
                   "FTDI, ESP32-S3/C3 native USB)")
    g.add_argument("--baud", type=int, default=115200, help="serial baud rate (default 115200)")
    g.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for each answer (default 20: an "
                   "ESP32 does its P-256 work in MicroPython)")
    g.add_argument("--flash", type=Path, metavar="IMAGE", help="first erase the flash and write this MicroPython "
                   "image with esptool (hardware)")
    g.add_argument("--chip", default="esp32", choices=sorted(FLASH_OFFSET),
                   help="chip for --flash: offset 0x1000 on esp32/esp32s2, 0x0 on esp32s3/c3/c6")
    g.add_argument("--deploy", type=Path, metavar="BUILD", help="copy this firmware build (make firmware) onto the "
                   "board with mpremote first (hardware)")
    g.add_argument("--deploy-files", action="store_true", help="with --deploy: .mpy files, not the ROMFS image")
    g.add_argument("--firmware", type=Path, metavar="BUILD", help="refuse a device not running this build "
                   "(its firmware hash)")

    g = ap.add_argument_group("the device")
    g.add_argument("--role", choices=sorted(ROLES), help="payer (wallet card) or payee (merchant terminal)")
    g.add_argument("--name", help="the device's name (1-16 characters, no spaces)")
    g.add_argument("--amount", type=int, help="payee: the amount the terminal asks for, minor units")
    g.add_argument("--balance", type=int, default=0, help="payer: the first load, minor units, issued by the "
                   "backend (treasury token)")
    g.add_argument("--voucher", type=Path, help="payer: the first load as a backend-signed voucher file (hex)")
    g.add_argument("--device-id", help="16 hex digits (default: random; a resumed device keeps its own)")
    lim = protocol.Limits()
    g.add_argument("--currency", type=int, default=lim.currency, help="ISO 4217 numeric (default %(default)s)")
    g.add_argument("--limit-payment", type=int, default=lim.per_payment, help="per payment (default %(default)s)")
    g.add_argument("--limit-offline", type=int, default=lim.offline, help="spent offline (default %(default)s)")
    g.add_argument("--max-holding", type=int, default=lim.max_holding, help="balance held (default %(default)s)")
    g.add_argument("--valid-days", type=int, default=365, help="certificate validity (default %(default)s)")

    g = ap.add_argument_group("issuer and backend")
    g.add_argument("--issuer-key", type=Path, help=f"the issuer key file (PKCS#8, encrypted; ${PASSPHRASE_ENV})")
    g.add_argument("--new-issuer-key", type=Path, metavar="FILE", help="create an issuer key file (mode 0600, "
                   "encrypted with the passphrase; FILE.pub: public key) and exit")
    g.add_argument("--backend", help="the backend's URL: its keys (GET /v1/keys), registration, first loads")
    g.add_argument("--backend-keys", type=Path, help="without a backend (simulation): JSON file "
                   '{"backend": hex, "backend_kx": hex} of its public keys; nothing is registered')

    g = ap.add_argument_group("production line")
    g.add_argument("--batch", type=int, metavar="N", help="provision N devices one after another (0: until "
                   "Ctrl-C), waiting for each next blank device on the port")
    g.add_argument("--wait", type=float, default=120.0, help="batch: seconds to wait for the next device")
    g.add_argument("--stop-on-error", action="store_true", help="batch: stop at the first failure")
    g.add_argument("--log", type=Path, help="append a JSON line per device to this file")
    g.add_argument("--operator", default=os.environ.get("USER", "operator"), help="the operator's name for the log")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return ap


def _passphrase(confirm: bool = False) -> bytes:
    value = os.environ.get(PASSPHRASE_ENV)
    if value:
        return value.encode()
    if not sys.stdin.isatty():
        raise StationError("key", f"set {PASSPHRASE_ENV} (no terminal to ask on)")
    first = getpass.getpass("issuer key passphrase: ")
    if confirm and getpass.getpass("again: ") != first:
        raise StationError("key", "passphrases differ")
    return first.encode()


def spec_from(a: argparse.Namespace) -> Spec:
    if a.role is None:
        raise StationError("usage", "--role payer|payee is required")
    role = ROLES[a.role]
    device_id = None
    if a.device_id:
        try:
            device_id = bytes.fromhex(a.device_id)
        except ValueError:
            device_id = b""
        if len(device_id) != wire.ID_LEN:
            raise StationError("usage", "--device-id: 16 hex digits")
    voucher = None
    if a.voucher:
        try:
            voucher = bytes.fromhex(a.voucher.read_text().strip())
        except (OSError, ValueError) as e:
            raise StationError("usage", f"--voucher {a.voucher}: {e}") from None
    if (a.balance or voucher) and role != wire.ROLE_PAYER:
        raise StationError("usage", "--balance/--voucher: payers only")
    if a.amount is not None and role != wire.ROLE_PAYEE:
        raise StationError("usage", "--amount: payees only")
    fw_hash = None
    if a.firmware:
        from paytoken_host.fwbuild import firmware_hash

        fw_hash = firmware_hash(a.firmware)
    limits = protocol.Limits(a.currency, a.limit_payment, a.limit_offline, a.max_holding)
    return Spec(role, a.name, a.amount, a.balance, voucher, device_id, limits, a.valid_days,
                expect_fw_hash=fw_hash)


def station_from(a: argparse.Namespace, say) -> Station:
    if a.issuer_key is None:
        raise StationError("usage", "--issuer-key FILE is required (create one with --new-issuer-key)")
    key = load_issuer_key(a.issuer_key, _passphrase())
    if a.backend:
        backend = Backend(a.backend, os.environ.get("PAYTOKEN_PROVISIONING_TOKEN"),
                          os.environ.get("PAYTOKEN_TREASURY_TOKEN"))
        return Station(key, backend, progress=say)
    if a.backend_keys:
        try:
            d = json.loads(a.backend_keys.read_text())
            keys = {k: bytes.fromhex(d[k]) for k in ("backend", "backend_kx")}
        except (OSError, ValueError, KeyError) as e:
            raise StationError("usage", f"--backend-keys {a.backend_keys}: {e}") from None
        return Station(key, None, keys, progress=say)
    raise StationError("usage", "--backend URL (or --backend-keys FILE in simulation) is required")


def wait_for_device(port_arg: str | None, a: argparse.Namespace, say) -> SerialLink:
    """A link to the next device that is not finalised (batch mode): polls the port until one answers."""
    from paytoken.usb import frames

    deadline = time.monotonic() + a.wait
    last = ""
    while True:
        try:
            link = SerialLink(choose_port(port_arg), a.baud, timeout=1.0, retries=0)
            try:
                info = json.loads(link.request(frames.T_IDENTIFY))
                if info.get("state") != "final":
                    link.timeout, link.retries = a.timeout, 1
                    return link
                last = f"device {info.get('id')} is finalised: unplug it and plug in the next"
            except StationError as e:
                last = e.message
            link.close()
        except StationError as e:
            last = e.message
        if time.monotonic() > deadline:
            raise StationError("no_answer", f"no next device within {a.wait:g} s ({last})")
        say(f"waiting for the next device ({last})")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)

    def say(msg: str) -> None:
        if not a.quiet:
            print(f"provision: {msg}", file=sys.stderr, flush=True)

    try:
        if a.new_issuer_key:
            from paytoken_host.backend.keys import create_key_file

            try:
                create_key_file(a.new_issuer_key, _passphrase(confirm=True))
            except FileExistsError:
                raise StationError("key", f"{a.new_issuer_key} exists: refusing to overwrite a key") from None
            except ValueError as e:
                raise StationError("key", str(e)) from None
            print(f"issuer key written to {a.new_issuer_key} (mode 0600, encrypted); public key in "
                  f"{a.new_issuer_key}.pub")
            return 0
        spec = spec_from(a)
        station = station_from(a, say)
        station.backend_keys()  # the backend's keys and issuer checked before any device is touched
        if a.flash or a.deploy:
            port = choose_port(a.port)
            if a.flash:
                say(f"flashing {a.flash} to {port} ({a.chip})")
                flash_micropython(port, a.chip, a.flash)
            if a.deploy:
                say(f"deploying {a.deploy} to {port}")
                deploy_firmware(port, a.deploy, romfs=not a.deploy_files)
    except StationError as e:
        print(f"provision: {e.kind}: {e.message}", file=sys.stderr)
        return e.exit_code
    if a.batch is None:
        return run_one(a, station, spec, say, wait=bool(a.flash or a.deploy))
    return run_batch(a, station, spec, say)


def _fail(a: argparse.Namespace, e: StationError, device: str | None = None) -> int:
    print(f"provision: failed: {e.kind}: {e.message}", file=sys.stderr)
    if a.log:
        append_log(a.log, {"time": int(time.time()), "operator": a.operator, "device_id": device,
                           "failed": e.kind, "error": e.message})
    return e.exit_code


def run_one(a: argparse.Namespace, station: Station, spec: Spec, say, wait: bool = False) -> int:
    """One device; wait: it has just been flashed and is booting (its first answer may take a while)."""
    try:
        link = wait_for_device(a.port, a, say) if wait else SerialLink(choose_port(a.port), a.baud, a.timeout)
        with link:
            result = station.provision(link, spec)
    except StationError as e:
        return _fail(a, e)
    if a.log:
        append_log(a.log, result.record(a.operator))
    print(result.line())
    return 0


def run_batch(a: argparse.Namespace, station: Station, spec: Spec, say) -> int:
    first_failure = 0
    done = failed = 0
    try:
        while a.batch == 0 or done + failed < a.batch:
            total = f"/{a.batch}" if a.batch else ""
            say(f"[{done + failed + 1}{total}] waiting for a device")
            try:
                link = wait_for_device(a.port, a, say)
            except StationError as e:
                code = _fail(a, e)
                return first_failure or code
            with link:
                try:
                    result = station.provision(link, Spec(**{**spec.__dict__}))
                except StationError as e:
                    failed += 1
                    first_failure = first_failure or _fail(a, e)
                    if a.stop_on_error:
                        break
                    continue
            done += 1
            if a.log:
                append_log(a.log, result.record(a.operator))
            print(f"[{done + failed}{total}] {result.line()}", flush=True)
    except KeyboardInterrupt:
        say("interrupted")
    say(f"batch: {done} provisioned, {failed} failed")
    return first_failure

