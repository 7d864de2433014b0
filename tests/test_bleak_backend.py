"""bleak on the simulated radio (paytoken_host.simradio.bleak_backend): host code written against bleak's public
API finds, connects to and talks GATT with a MicroPython peripheral (the ESP32-exact `bluetooth` module on the
unix port, joined by the broker), with only `backend=` differing from code for real hardware.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from bleak import BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.exc import (
    BleakBluetoothNotAvailableError,
    BleakCharacteristicNotFoundError,
    BleakDeviceNotFoundError,
    BleakError,
    BleakGATTProtocolError,
    BleakGATTProtocolErrorCode,
)
from bleak.uuids import normalize_uuid_16

from paytoken_host.simradio import BrokerThread, RadioClient
from paytoken_host.simradio.bleak_backend import SimBleakClient, SimBleakScanner, parse_ad
from tests.harness.radio import DeviceProcess

SVC = "7e570001-0c1e-4b1d-8e1c-5a6b7c8d9e0f"
RD = "7e570002-0c1e-4b1d-8e1c-5a6b7c8d9e0f"  # read, notify: values the peripheral is told to send
WR = "7e570003-0c1e-4b1d-8e1c-5a6b7c8d9e0f"  # write, write without response: commands; a user description
LOG = "7e570004-0c1e-4b1d-8e1c-5a6b7c8d9e0f"  # read: the last value written to WR, as the peripheral read it
IND = "7e570005-0c1e-4b1d-8e1c-5a6b7c8d9e0f"  # indicate only
BATTERY, LEVEL = normalize_uuid_16(0x180F), normalize_uuid_16(0x2A19)
CCCD, USER_DESCRIPTION = normalize_uuid_16(0x2902), normalize_uuid_16(0x2901)
ADDR = "C0:DE:00:00:00:01"
NAME = "bleak-per"
RSSI = -61

# The peripheral: advertises (flags, our service, manufacturer data; name, battery service data and TX power in
# the scan response), serves any number of connections one after the other, and obeys commands written to WR.
PERIPHERAL = r"""
U = bluetooth.UUID
F = bluetooth
SVC_U = U("%(SVC)s")
RD_C = (U("%(RD)s"), F.FLAG_READ | F.FLAG_NOTIFY)
WR_C = (U("%(WR)s"), F.FLAG_WRITE | F.FLAG_WRITE_NO_RESPONSE, ((U(0x2901), F.FLAG_READ),))
LOG_C = (U("%(LOG)s"), F.FLAG_READ)
IND_C = (U("%(IND)s"), F.FLAG_INDICATE)
BAT = (U(0x180F), ((U(0x2A19), F.FLAG_READ),))
STOP = []
CONNS = []
MTUS = []

def pattern(n):
    return bytes((i * 7 + 3) & 255 for i in range(n))

def advertise():
    ble.gap_advertise(20000, ADV, resp_data=RESP)

def irq(e, d):
    if e == 1:
        CONNS.append(d[0])
    elif e == 2:
        if not STOP:
            advertise()
    elif e == 21:
        MTUS.append(d[1])
    elif e == 3 and d[1] == WRH:
        conn = d[0]
        v = bytes(ble.gatts_read(WRH))
        ble.gatts_write(LOGH, v)
        cmd, _, arg = v.partition(b":")
        if cmd == b"notify":
            ble.gatts_notify(conn, RDH, pattern(int(arg)))
        elif cmd == b"update":  # to subscribed clients only
            ble.gatts_write(RDH, pattern(int(arg)), True)
        elif cmd == b"indicate":
            ble.gatts_indicate(conn, INDH, pattern(int(arg)))
        elif cmd == b"bye":
            ble.gap_disconnect(conn)
        elif cmd == b"stop":
            STOP.append(1)

ble.irq(irq)
ble.active(True)
ble.config(gap_name=b"%(NAME)s-gap", mtu=%(MTU)d)
((RDH, WRH, DSCH, LOGH, INDH), (LEVELH,)) = ble.gatts_register_services(
    ((SVC_U, (RD_C, WR_C, LOG_C, IND_C)), BAT))
ble.gatts_set_buffer(WRH, 200)
ble.gatts_set_buffer(LOGH, 200)
ble.gatts_write(RDH, pattern(%(RD_LEN)d))
ble.gatts_write(DSCH, b"commands")
ble.gatts_write(LEVELH, b"\x64")
ADV = b"\x02\x01\x06" + bytes((17, 0x07)) + bytes(SVC_U) + b"\x06\xff\xff\xff\x01hi"
RESP = bytes((len(b"%(NAME)s") + 1, 0x09)) + b"%(NAME)s" + b"\x04\x16\x0f\x18\x64" + b"\x02\x0a\xf7"
advertise()
t0 = time.ticks_ms()
while not STOP and time.ticks_diff(time.ticks_ms(), t0) < %(LIFE_MS)d:
    bluetooth._pump(10)
result(conns=CONNS, mtus=MTUS, handles=[RDH, WRH, DSCH, LOGH, INDH, LEVELH])
"""


def pattern(n: int) -> bytes:
    return bytes((i * 7 + 3) & 255 for i in range(n))


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerThread]:
    with BrokerThread(seed=5) as radio:
        yield radio


@pytest.fixture
def radio(broker: BrokerThread) -> Iterator[BrokerThread]:
    broker.reset()
    broker.config(interval_ms=7.5)  # fast links: these tests are about the API, not throughput
    yield broker
    for link in broker.links():
        broker.drop(link["link"])
    broker.reset()


@pytest.fixture
def peripheral(radio: BrokerThread) -> Iterator[DeviceProcess]:
    yield from start_peripheral(radio)


def start_peripheral(radio: BrokerThread, mtu: int = 256, rd_len: int = 60,
                     life_ms: int = 20_000) -> Iterator[DeviceProcess]:
    body = PERIPHERAL % dict(SVC=SVC, RD=RD, WR=WR, LOG=LOG, IND=IND, NAME=NAME, MTU=mtu, RD_LEN=rd_len,
                             LIFE_MS=life_ms)
    dev = DeviceProcess(radio.address, body, NAME, env={"PAYTOKEN_RADIO_ADDR": ADDR})
    try:
        radio.wait_for(lambda: [d for d in radio.devices() if d["name"] == NAME and d["advertising"]], timeout=10)
        radio.config(device=NAME, rssi=RSSI)
        yield dev
    finally:
        dev.kill()


def stop(radio: BrokerThread, dev: DeviceProcess) -> dict[str, Any]:
    """Tell the peripheral to finish (a write of "stop" over a fresh connection) and return its result."""

    async def tell() -> None:
        async with BleakClient(ADDR, backend=SimBleakClient, radio=radio.address, timeout=5) as client:
            await client.write_gatt_char(WR, b"stop", response=False)  # it ends at once: no response

    asyncio.run(tell())
    return dev.result()


# --------------------------------------------------------------------------- scanning


def test_discover_reports_advertising_and_scan_response_data(radio: BrokerThread, peripheral: DeviceProcess,
                                                             monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PAYTOKEN_RADIO", radio.address)  # how host code finds the radio by default

    async def scenario() -> dict[str, Any]:
        found = await BleakScanner.discover(timeout=0.4, return_adv=True, backend=SimBleakScanner)
        passive = await BleakScanner.discover(timeout=0.4, return_adv=True, backend=SimBleakScanner,
                                              scanning_mode="passive")
        by_filter = await BleakScanner.find_device_by_filter(
            lambda d, ad: ad.manufacturer_data.get(0xFFFF) == b"\x01hi", timeout=3, backend=SimBleakScanner)
        by_name = await BleakScanner.find_device_by_name(NAME, timeout=3, backend=SimBleakScanner)
        by_address = await BleakScanner.find_device_by_address(ADDR.lower(), timeout=3, backend=SimBleakScanner)
        wanted = await BleakScanner.discover(timeout=0.3, backend=SimBleakScanner, service_uuids=[SVC.upper()])
        others = await BleakScanner.discover(timeout=0.3, backend=SimBleakScanner, service_uuids=["180d"])
        seen: list[str] = []
        async with BleakScanner(lambda d, ad: seen.append(d.address), backend=SimBleakScanner) as scanner:
            await asyncio.sleep(0.2)
            streamed = None
            async for device, adv in scanner.advertisement_data():
                if device.address == ADDR:
                    streamed = adv
                    break
        return dict(found=found, passive=passive, by_filter=by_filter, by_name=by_name, by_address=by_address,
                    wanted=wanted, others=others, seen=seen, streamed=streamed)

    r = asyncio.run(scenario())
    device, adv = r["found"][ADDR]
    assert device.address == ADDR and device.name == NAME
    assert adv.local_name == NAME
    assert adv.service_uuids == [SVC]
    assert adv.manufacturer_data == {0xFFFF: b"\x01hi"}
    assert adv.service_data == {BATTERY: b"\x64"}
    assert adv.tx_power == -9
    assert adv.rssi == RSSI
    # a passive scan gets no scan response: no name, service data or TX power
    _, padv = r["passive"][ADDR]
    assert (padv.local_name, padv.service_data, padv.tx_power) == (None, {}, None)
    assert padv.service_uuids == [SVC] and padv.manufacturer_data == {0xFFFF: b"\x01hi"}
    for key in ("by_filter", "by_name", "by_address"):
        assert r[key] is not None and r[key].address == ADDR, key
    assert ADDR in [d.address for d in r["wanted"]]  # the filter matches whatever the case or form of the UUID
    assert ADDR not in [d.address for d in r["others"]]
    assert ADDR in r["seen"] and r["streamed"].local_name == NAME


def test_advertising_data_parsing_keeps_what_is_well_formed(radio: BrokerThread, caplog: pytest.LogCaptureFixture):
    ad = parse_ad(bytes.fromhex("020106" "03030f18" "0409616263" "04ff3412"))  # the last one claims 4, has 3
    assert ad.service_uuids == [BATTERY] and ad.local_name == "abc"
    assert ad.manufacturer_data == {} and "claims 4 bytes" in (ad.error or "")
    short = parse_ad(bytes.fromhex("02ff01")).error
    assert short == "AD type 0xff: manufacturer data shorter than its company identifier"
    assert "not a list of 2-byte UUIDs" in (parse_ad(bytes.fromhex("0403010203")).error or "")
    assert parse_ad(bytes.fromhex("0208410000")).local_name == "A"  # zero length: padding ends the data

    async def scenario() -> Any:
        async with RadioClient(radio.address, name="rogue") as rogue:
            await rogue.advertise(20_000, adv_data=bytes.fromhex("0509726f677507ff"), connectable=False)
            return await BleakScanner.find_device_by_filter(lambda d, ad: d.address == rogue_addr(rogue), timeout=3,
                                                            backend=SimBleakScanner, radio=radio.address)

    def rogue_addr(client: RadioClient) -> str:
        return ":".join(f"{b:02X}" for b in client.addr)

    with caplog.at_level(logging.WARNING, logger="paytoken.simradio.bleak"):
        device = asyncio.run(scenario())
    assert device is not None and device.name == "rogu"  # reported with the structures before the broken one
    assert "malformed advertising data" in caplog.text


def test_errors_when_there_is_no_radio_or_no_such_device(radio: BrokerThread, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("PAYTOKEN_RADIO", raising=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"

    async def scenario() -> dict[str, BaseException]:
        errors: dict[str, BaseException] = {}
        for key, coro in (
            ("unset", BleakScanner.discover(timeout=0.1, backend=SimBleakScanner)),
            ("dead", BleakScanner.discover(timeout=0.1, backend=SimBleakScanner, radio=dead)),
            ("missing", BleakClient("C0:DE:00:00:00:99", backend=SimBleakClient, radio=radio.address,
                                    timeout=0.5).connect()),
        ):
            try:
                await coro
            except BaseException as exc:  # noqa: B036 - the test records what each raised
                errors[key] = exc
        return errors

    errors = asyncio.run(scenario())
    assert isinstance(errors["unset"], BleakBluetoothNotAvailableError) and "PAYTOKEN_RADIO" in str(errors["unset"])
    assert isinstance(errors["dead"], BleakBluetoothNotAvailableError) and dead in str(errors["dead"])
    assert isinstance(errors["missing"], BleakDeviceNotFoundError)
    assert errors["missing"].identifier == "C0:DE:00:00:00:99"
    with pytest.raises(ValueError, match="host:port"):
        BleakScanner(backend=SimBleakScanner, radio="nowhere")
    with pytest.raises(ValueError, match="not a Bluetooth address"):
        BleakClient("12:34", backend=SimBleakClient, radio=radio.address)
    with pytest.raises(BleakError, match="scanning_mode"):
        BleakScanner(backend=SimBleakScanner, radio=radio.address, scanning_mode="sideways")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- GATT


def test_connect_services_read_write_notify_mtu(radio: BrokerThread, peripheral: DeviceProcess):
    async def scenario() -> dict[str, Any]:
        r: dict[str, Any] = {}
        device = await BleakScanner.find_device_by_name(NAME, timeout=3, backend=SimBleakScanner,
                                                        radio=radio.address)
        assert device is not None
        gone: list[BleakClient] = []
        async with BleakClient(device, gone.append, backend=SimBleakClient) as client:
            r["name"], r["mtu"], r["link"] = client.name, client.mtu_size, radio.links()[0]
            svcs = client.services
            r["services"] = [s.uuid for s in svcs]
            rd, wr, log, ind = (svcs.get_characteristic(u) for u in (RD, WR, LOG, IND))
            r["props"] = [c.properties for c in (rd, wr, log, ind)]
            r["descriptors"] = {c.uuid: [d.uuid for d in c.descriptors] for c in (rd, wr, log, ind)}
            r["handles"] = [rd.handle, wr.handle, log.handle, ind.handle, svcs.get_service(SVC).handle]
            r["max_wwr"] = wr.max_write_without_response_size
            r["read"] = await client.read_gatt_char(RD)
            r["level"] = await client.read_gatt_char(LEVEL)
            r["description"] = await client.read_gatt_descriptor(wr.get_descriptor(USER_DESCRIPTION))

            await client.write_gatt_char(WR, b"hello", response=True)
            r["log_after_request"] = await client.read_gatt_char(LOG)
            await client.write_gatt_char(wr, b"no answer", response=False)
            await asyncio.sleep(0.1)
            r["log_after_command"] = await client.read_gatt_char(log)
            with pytest.raises(BleakGATTProtocolError) as denied:
                await client.write_gatt_char(rd, b"x", response=True)  # RD has no write permission
            r["denied"] = denied.value.code
            await client.write_gatt_char(rd, b"x", response=False)  # a command is refused silently
            with pytest.raises(BleakError, match="do not fit one ATT write"):
                await client.write_gatt_char(WR, bytes(client.mtu_size - 2), response=True)
            with pytest.raises(BleakGATTProtocolError) as unreadable:
                await client.read_gatt_char(WR)
            r["unreadable"] = unreadable.value.code

            notes: asyncio.Queue[tuple[str, bytearray]] = asyncio.Queue()

            async def on_note(char: BleakGATTCharacteristic, data: bytearray) -> None:  # async callbacks work
                await notes.put((char.uuid, data))

            cccd = rd.get_descriptor(CCCD)
            r["cccd_before"] = await client.read_gatt_descriptor(cccd)
            await client.start_notify(RD, on_note)
            r["cccd_on"] = await client.read_gatt_descriptor(cccd.handle)
            await client.write_gatt_char(WR, b"notify:10", response=True)
            r["small"] = await asyncio.wait_for(notes.get(), 3)
            await client.write_gatt_char(WR, b"notify:400", response=True)  # more than MTU - 3
            r["big"] = await asyncio.wait_for(notes.get(), 3)
            await client.write_gatt_char(WR, b"update:5", response=True)
            r["update"] = await asyncio.wait_for(notes.get(), 3)
            r["cached"] = await client.read_gatt_char(RD, use_cached=True)
            await client.stop_notify(RD)
            r["cccd_off"] = await client.read_gatt_descriptor(cccd.handle)
            stats = radio.stats(r["link"]["link"])["stats"]["p2c"]["pdus"]
            await client.write_gatt_char(WR, b"update:6", response=True)
            await asyncio.sleep(0.2)
            r["update_pdus"] = radio.stats(r["link"]["link"])["stats"]["p2c"]["pdus"] - stats  # the write response

            indications: list[bytearray] = []
            await client.start_notify(ind, lambda c, d: indications.append(d))
            r["ind_cccd"] = await client.read_gatt_descriptor(ind.get_descriptor(CCCD))
            await client.write_gatt_char(WR, b"indicate:7", response=True)
            await asyncio.sleep(0.2)
            r["indications"] = indications
            with pytest.raises(BleakError, match="neither notify nor indicate"):
                await client.start_notify(LOG, lambda c, d: None)
            with pytest.raises(BleakError, match="pairing"):
                await client.pair()
            with pytest.raises(BleakCharacteristicNotFoundError):
                await client.read_gatt_char("0000abcd-0000-1000-8000-00805f9b34fb")
        r["after"] = (client.is_connected, len(gone), gone and gone[0] is client)
        with pytest.raises(BleakError, match="Service Discovery has not been performed"):
            client.services  # noqa: B018 - the property raises once disconnected

        # the services filter, and an MTU offer below the peripheral's
        async with BleakClient(ADDR, services=[BATTERY], backend=SimBleakClient, radio=radio.address,
                               mtu=100) as small:
            r["filtered"] = [s.uuid for s in small.services]
            r["small_mtu"] = small.mtu_size
            r["small_link_mtu"] = radio.stats(radio.links()[0]["link"])["mtu"]
        return r

    r = asyncio.run(scenario())
    assert r["name"] == NAME  # from the advertising data
    assert r["mtu"] == 256 and radio.stats(r["link"]["link"])["mtu"] == 256  # min(517 offered, the ESP32's 256)
    assert r["services"] == [SVC, BATTERY]  # GAP and GATT are the stack's own (BlueZ does not list them)
    assert r["props"] == [["read", "notify"], ["write-without-response", "write"], ["read"], ["indicate"]]
    assert r["descriptors"] == {RD: [CCCD], WR: [USER_DESCRIPTION], LOG: [], IND: [CCCD]}
    p = stop(radio, peripheral)
    rdh, wrh, _, logh, indh, _ = p["handles"]
    # characteristics are named by their declaration handle (one before the value), services by their first
    assert r["handles"] == [rdh - 1, wrh - 1, logh - 1, indh - 1, rdh - 2]
    assert r["max_wwr"] == 253
    assert r["read"] == pattern(60) and r["level"] == b"\x64" and r["description"] == b"commands"
    assert r["log_after_request"] == b"hello" and r["log_after_command"] == b"no answer"
    assert r["denied"] == BleakGATTProtocolErrorCode.WRITE_NOT_PERMITTED
    assert r["unreadable"] == BleakGATTProtocolErrorCode.READ_NOT_PERMITTED
    assert r["cccd_before"] == b"\x00\x00" and r["cccd_on"] == b"\x01\x00" and r["cccd_off"] == b"\x00\x00"
    assert r["small"] == (RD, pattern(10))
    assert r["big"] == (RD, pattern(253))  # cut to MTU - 3 by the sending stack, as on hardware
    assert r["update"] == (RD, pattern(5)) and r["cached"] == pattern(5)
    assert r["update_pdus"] == 1  # unsubscribed: the update went nowhere, only the write response came
    assert r["ind_cccd"] == b"\x02\x00" and r["indications"] == [pattern(7)]
    assert r["after"] == (False, 1, True)  # our own disconnect calls the callback once, as BlueZ does
    assert r["filtered"] == [BATTERY]
    assert r["small_mtu"] == 100 and r["small_link_mtu"] == 100
    assert p["mtus"] == [256, 100, 256]  # the peripheral saw every exchange (the third: stop())


def test_disconnect_callbacks_on_link_drops(radio: BrokerThread, peripheral: DeviceProcess):
    async def scenario() -> dict[str, Any]:
        r: dict[str, Any] = {}
        loop = asyncio.get_running_loop()
        gone: asyncio.Queue[BleakClient] = asyncio.Queue()

        def on_gone(c: BleakClient) -> None:
            assert asyncio.get_running_loop() is loop  # scheduled on the client's loop
            gone.put_nowait(c)

        # 1: the broker drops the link (supervision timeout, as when the peer goes out of range)
        client = BleakClient(ADDR, on_gone, backend=SimBleakClient, radio=radio.address, timeout=5)
        await client.connect()
        radio.drop(radio.links()[0]["link"])
        r["drop"] = await asyncio.wait_for(gone.get(), 3) is client
        r["drop_state"] = client.is_connected
        with pytest.raises(BleakError, match="Service Discovery has not been performed"):
            await client.read_gatt_char(RD)

        # 2: the link drops while a read waits for its response
        await client.connect()  # the same client connects again
        r["reconnected"] = client.is_connected
        rd = client.services.get_characteristic(RD)
        radio.drop(radio.links()[0]["link"], after=1)  # the read request gets there, its response does not
        with pytest.raises(BleakError, match="Not connected: the link dropped") as mid:
            await client.read_gatt_char(rd)  # a characteristic object: no lookup in the services
        r["mid"] = str(mid.value)
        r["mid_gone"] = await asyncio.wait_for(gone.get(), 3) is client
        with pytest.raises(BleakError, match="Not connected"):
            await client.start_notify(rd, lambda c, d: None)  # bleak checks is_connected first

        # 3: the peripheral ends the connection
        async with BleakClient(ADDR, on_gone, backend=SimBleakClient, radio=radio.address, timeout=5) as third:
            await third.write_gatt_char(WR, b"bye", response=False)
            r["bye"] = await asyncio.wait_for(gone.get(), 3) is third
            r["bye_state"] = third.is_connected
        r["no_more"] = gone.empty()  # __aexit__'s disconnect on a dropped link calls nothing again
        return r

    r = asyncio.run(scenario())
    assert r["drop"] and r["drop_state"] is False
    assert r["reconnected"] and r["mid_gone"]
    assert "0x08: Connection Timeout" in r["mid"]
    assert r["bye"] and r["bye_state"] is False and r["no_more"]
    p = stop(radio, peripheral)
    assert len(p["conns"]) == 4
