"""USB provisioning (issue 8): the frame codec on both sides, the device's provisioning service under power
cuts at every flash write, and the station (host/provision.py) against simulated boards on pseudo-terminals
(pyserial opens them as real ports), with a real backend, through to a payment between the devices it made."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from paytoken import wire
from paytoken.usb import frames
from paytoken_host import demo, protocol, simdevice, station
from paytoken_host.backend.local import LocalBackend
from paytoken_host.simstation import PROVISION, SimBoard, SimStation
from paytoken_host.simusb import UsbBridge
from tests.harness.mp import FIRMWARE_BUILD, MicroPython, MicroPythonError

HARNESS = Path(__file__).parent / "harness"
USD = 840

# ---- the frame codec: one definition, the same bytes on the device and the host ----


@pytest.mark.parametrize("rtype,payload", [(frames.T_IDENTIFY, b""), (frames.T_KEYS, bytes(range(41))),
                                           (frames.T_VOUCHER, b"\x50\x54" * 300)])
def test_frames_are_the_same_bytes_on_device_and_host(mp, rtype, payload):
    frame = frames.encode(rtype, payload)
    assert mp.call("paytoken.usb.frames.encode", rtype, payload) == frame
    assert frames.decode(frame) == (rtype, payload)
    assert mp.call("paytoken.usb.frames.decode", frame) == [rtype, payload]
    assert len(frame) == frames.HEADER + len(payload) + 4 and frame[:3] == b"PT\x01"


def _bad(frame: bytes, at: int, value: int) -> bytes:
    out = bytearray(frame)
    out[at] = value
    return bytes(out)


def test_frame_decoding_is_strict_with_a_reason(mp):
    good = frames.encode(frames.T_INSTALL, b"certificate and keys")
    cases = {
        "crc": _bad(good, 10, good[10] ^ 1),
        "version 2": _bad(good, 2, 2),
        "truncated": good[:-1],
        "not exactly one frame": good + b"\x00",
    }
    long = bytearray(good)
    long[4:6] = (frames.MAX_PAYLOAD + 1).to_bytes(2, "big")
    cases["too long"] = bytes(long)
    for reason, frame in cases.items():
        with pytest.raises(frames.FrameError) as e:
            frames.decode(frame)
        assert e.value.reason == reason
        with pytest.raises(MicroPythonError) as me:
            mp.call("paytoken.usb.frames.decode", frame)
        assert me.value.kind == "FrameError" and reason in me.value.msg
    with pytest.raises(frames.FrameError):
        frames.encode(frames.T_VOUCHER, bytes(frames.MAX_PAYLOAD + 1))


def test_a_stream_with_noise_before_a_frame_still_yields_the_frame():
    class Port:
        def __init__(self, data: bytes):
            self.data = data

        def read(self, n: int, ms: int) -> bytes:
            out, self.data = self.data[:n], self.data[n:]
            return out

    frame = frames.encode(frames.T_FINALISE, b"12345678")
    port = Port(b"\x00PX\xffP" + frame)
    assert frames.read_frame(port, 0, 0) == (frames.T_FINALISE, b"12345678")
    assert frames.read_frame(port, 0, 0) is None  # nothing more: idle, not an error


SERVICE = """
from paytoken.usb import frames
from paytoken.usb.service import Error, Service
class _Port:
    def __init__(self, data):
        self.data = data
        self.out = bytearray()
    def read(self, n, ms):
        if not self.data:
            raise EOFError("unplugged")
        b = self.data[:n]
        self.data = self.data[n:]
        return b
    def write(self, b):
        self.out += b
class _Echo:
    TYPES = (0x11,)
    stop = None
    def handle(self, rtype, p):
        if p == b"no":
            raise Error(frames.E_REFUSED, "said no")
        return b"echo:" + p
"""


def test_the_usb_service_dispatches_by_type_to_registered_handlers(mp):
    """The dispatcher another handler (sync over USB) registers on: one response per request, by type."""
    bad = bytearray(frames.encode(0x11, b"x"))
    bad[-1] ^= 1
    stream = (frames.encode(0x11, b"hi") + frames.encode(0x11, b"no") + frames.encode(0x12) + b"\x00\x00"
              + bytes(bad) + frames.encode(0x11, b"again"))
    mp.exec(SERVICE + f"port = _Port({stream!r})\nsvc = Service(port)\nsvc.register(_Echo())\nwhy = svc.serve()")
    assert mp.eval("why") == "closed"
    out = mp.eval("bytes(port.out)")

    class Port:
        def read(self, n: int, ms: int) -> bytes:
            nonlocal out
            b, out = out[:n], out[n:]
            return b

    got = []
    while (f := frames.read_frame(Port(), 0, 0)) is not None:
        got.append(f)
    assert got == [(0x91, b"\x00echo:hi"), (0x91, bytes((frames.E_REFUSED,)) + b"said no"),
                   (0x92, bytes((frames.E_UNKNOWN,)) + b"type 18"), (frames.T_BAD_FRAME, b"\x01crc"),
                   (0x91, b"\x00echo:again")]
    with pytest.raises(MicroPythonError) as e:
        mp.exec("svc.register(_Echo())")
    assert "taken" in e.value.msg


# ---- power cuts at every flash write of the provisioning (MicroPython, emulated NOR flash) ----

class Cut(Exception):
    pass


class MpLink:
    """The station's requests straight into paytoken.provisioning on MicroPython (tests/harness/provcut.py)."""

    def __init__(self, proc: MicroPython):
        self.proc = proc
        self.sent = self.received = 0

    def request(self, rtype: int, payload: bytes = b"") -> bytes:
        status, body = self.proc.call("provcut.request", rtype, payload)
        if status == -1:
            raise Cut(body.decode())
        return station.answer(status, body)


@pytest.fixture(scope="module")
def cutmp(firmware_build):
    with MicroPython(heapsize="2M", extra_path=[HARNESS]) as proc:
        proc.exec("import provcut")
        yield proc


def _offline_station(auth: simdevice.Authority) -> station.Station:
    return station.Station(auth.issuer.key, None, {"backend": auth.backend_pub, "backend_kx": auth.backend_kx})


def _cut_points(boundaries: list[int], total: int, limit: int) -> list[int]:
    """Every write, or the first and last write of every step plus an even spread, up to about `limit`."""
    if total <= limit:
        return list(range(1, total + 1))
    points = {1, total}
    for b in boundaries:
        points |= {max(1, b), min(total, b + 1)}
    step = max(1, total // max(1, limit - len(points)))
    points |= set(range(1, total + 1, step))
    return sorted(points)


@pytest.mark.parametrize("role", [wire.ROLE_PAYER, wire.ROLE_PAYEE])
def test_power_cut_at_any_write_resumes_and_never_pays_half_provisioned(cutmp, request, role):
    auth = simdevice.Authority()
    st = _offline_station(auth)
    device_id = os.urandom(wire.ID_LEN)
    spec = station.Spec(role, name="cut", device_id=device_id,
                        voucher=auth.voucher(device_id, 1, 25_000) if role == wire.ROLE_PAYER else None)
    link = MpLink(cutmp)
    # the reference run: the writes each step makes
    cutmp.call("provcut.fresh")
    w0 = cutmp.call("provcut.writes")  # the format's own writes
    boundaries: list[int] = []
    res = st.provision(link, spec, after=lambda step: boundaries.append(cutmp.call("provcut.writes") - w0))
    total = cutmp.call("provcut.writes") - w0
    assert cutmp.call("provcut.loadable") and total > 10 and res.device_id == device_id
    limit = 10_000 if request.config.getoption("--run-slow") else 60  # about 40: every write
    points = _cut_points(boundaries, total, limit)
    states = set()
    for n in points:
        cutmp.call("provcut.fresh")
        cutmp.call("provcut.cut_at", n)
        with pytest.raises(Cut):
            st.provision(link, spec)
        state = cutmp.call("provcut.reboot")
        states.add(state)
        # a device pays only when finalised; until then store.load() refuses it
        assert cutmp.call("provcut.loadable") == (state == "final"), (n, state)
        if state == "final":  # the lock was written: provisioning is over
            with pytest.raises(station.StationError) as e:
                st.provision(link, spec)
            assert e.value.kind == "locked"
        else:  # the station simply runs again: it resumes (or starts over from blank)
            again = st.provision(link, spec)
            assert again.device_id == device_id and again.resumed == (state != "blank")
        assert cutmp.call("provcut.loadable")
        info = json.loads(link.request(frames.T_IDENTIFY))
        assert info["state"] == "final" and info["id"] == device_id.hex()
        if role == wire.ROLE_PAYER:
            assert info["balance"] == 25_000, n  # the voucher counted exactly once
    assert {"blank", "keys", "certified"} <= states


# ---- the station over a pseudo-terminal ----

@pytest.fixture
def sim(tmp_path, firmware_build):
    boards: list[SimBoard] = []

    def board(name: str = "device") -> SimBoard:
        b = SimBoard(tmp_path / f"{name}.img", FIRMWARE_BUILD, name=name)
        boards.append(b)
        return b

    yield board
    for b in boards:
        b.close()


def read_store(image: Path) -> dict[str, bytes]:
    """The device's store files, read off its flash image by the firmware (the private keys included)."""
    src = (f"import board, os\nfrom binascii import hexlify\nr = board.storage({str(image)!r}, '/f')\n"
           "for n in os.listdir('/f/store'):\n"
           "    print('FILE', n, hexlify(open('/f/store/' + n, 'rb').read()).decode())\n")
    out = simdevice.run_firmware(src, FIRMWARE_BUILD).stdout
    return {p[1]: bytes.fromhex(p[2]) if len(p) > 2 else b"" for p in (x.split() for x in out.splitlines())
            if p[:1] == ["FILE"]}


def loadable(image: Path) -> str:
    """'ok' if store.load() accepts the device's store (it would pay), else the StoreError."""
    src = (f"import board\nfrom paytoken import store\nr = board.storage({str(image)!r}, '/f')\n"
           "try:\n    store.load(r)\n    print('LOAD ok')\nexcept store.StoreError as e:\n    print('LOAD', e)\n")
    out = simdevice.run_firmware(src, FIRMWARE_BUILD).stdout
    return next(x[5:] for x in out.splitlines() if x.startswith("LOAD "))


def assert_no_secrets(secrets: list[bytes], blobs: dict[str, bytes]) -> None:
    for s in secrets:
        assert len(s) == 32
        forms = [s, s.hex().encode(), s.hex().upper().encode()]
        for where, blob in blobs.items():
            for f in forms:
                assert f not in blob, f"a private key appears in {where}"


@pytest.fixture(scope="module")
def backend(tmp_path_factory, firmware_build):
    """A real `paytoken-backend serve` (SQLite) set up with its CLI; the issuer key made by provision.py."""
    tmp = tmp_path_factory.mktemp("backend")
    env = {**os.environ, "PAYTOKEN_KEY_PASSPHRASE": "station-passphrase"}
    made = subprocess.run([sys.executable, str(PROVISION), "--new-issuer-key", str(tmp / "issuer.key")], env=env,
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert (tmp / "issuer.key").stat().st_mode & 0o777 == 0o600
    with LocalBackend.create(tmp, tmp / "issuer.key.pub", "station-passphrase") as be:
        yield {"url": be.url, "tokens": be.tokens, "issuer_key": tmp / "issuer.key", "tmp": tmp}


def test_provision_payee_and_payer_with_the_backend_then_they_pay(backend, sim, tmp_path):
    env = {"PAYTOKEN_PROVISIONING_TOKEN": backend["tokens"]["provisioning"],
           "PAYTOKEN_TREASURY_TOKEN": backend["tokens"]["treasury"]}
    st = SimStation(tmp_path / "station", FIRMWARE_BUILD, backend_url=backend["url"], env=env,
                    issuer_key=backend["issuer_key"], passphrase="station-passphrase")
    made = {}
    transcripts = {}
    outputs = b""
    for name, args in (("payee", ["--role", "payee", "--name", "till-1", "--amount", "2500"]),
                       ("payer", ["--role", "payer", "--name", "card-1", "--balance", "60000"])):
        board = sim(name)
        board.power_on()
        res = st.run(board, args + ["--firmware", str(FIRMWARE_BUILD)])
        assert res.returncode == 0, res.stderr
        assert board.wait_exit() == 0 and "EVENT device provisioning end=restart" in board.lines()
        assert res.line.startswith(f"provisioned {name} {res.device_id.hex()} ")
        assert "identify" in res.stderr and "finalise" in res.stderr  # progress on stderr
        made[name] = res
        transcripts[name] = board.usb.raw()
        outputs += (res.stdout + res.stderr).encode()
    # the log: one JSON line per device with its public data
    records = [json.loads(x) for x in (tmp_path / "station" / "provisioned.jsonl").read_text().splitlines()]
    assert [r["role"] for r in records] == ["payee", "payer"]
    payer = made["payer"].record
    issuer_pub = bytes.fromhex(Path(str(backend["issuer_key"]) + ".pub").read_text().strip())
    cert = protocol.verify_cert(bytes.fromhex(payer["certificate"]), issuer_pub)
    assert cert.serial == payer["certificate_serial"] and cert.device_id.hex() == payer["device_id"]
    identity = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), cert.identity_pub)
    assert protocol.sec1(identity) == bytes.fromhex(payer["identity_public_key"])
    assert payer["balance"] == 60_000 and payer["operator"] and payer["firmware_hash"]
    assert made["payee"].record["x25519_public_key"] and payer["x25519_public_key"] is None
    # registered with the backend, which issued the load
    devices = httpx.get(backend["url"] + "/v1/devices",
                        headers={"Authorization": f"Bearer {backend['tokens']['auditor']}"}).json()
    assert {made["payee"].device_id.hex(), made["payer"].device_id.hex()} <= {d["device_id"] for d in devices}
    # the private keys, made on the devices, never crossed the cable nor reached the station's files
    secrets = []
    for name in ("payee", "payer"):
        files = read_store(sim_image(tmp_path, name))
        assert "final" in files and "prov.json" not in files
        secrets.append(files["identity.key"])
        if name == "payee":
            secrets.append(files["static.key"])
    station_files = {str(p): p.read_bytes() for p in (tmp_path / "station").rglob("*") if p.is_file()}
    assert_no_secrets(secrets, {**{f"transcript {k}": v for k, v in transcripts.items()}, **station_files,
                                "station output": outputs})
    # and the two devices pay each other over BLE (the demo's two-process harness)
    out = tmp_path / "pay"

    def already(out_dir: Path, firmware: Path, amount: int, balance: int, say) -> dict:
        for name in ("payee", "payer"):
            out_dir.joinpath(f"{name}.img").write_bytes(sim_image(tmp_path, name).read_bytes())
        return {n: demo.Provisioned(r.device_id, r.role, r.identity_pub) for n, r in made.items()}

    result = demo.pay(out, FIRMWARE_BUILD, amount=2500, screens=False, provision=already)
    assert result.paid["amount"] == "2500" and result.paid["payee"] == made["payee"].device_id.hex()
    assert demo.export(out / "payer.img", FIRMWARE_BUILD)[0] == 57_500
    assert demo.export(out / "payee.img", FIRMWARE_BUILD)[0] == 2_500


def sim_image(tmp_path: Path, name: str) -> Path:
    return tmp_path / f"{name}.img"


def test_a_station_of_another_issuer_is_refused_by_the_backend_before_any_device(backend, tmp_path):
    st = SimStation(tmp_path / "other", FIRMWARE_BUILD, backend_url=backend["url"])  # its own new issuer key
    with UsbBridge() as usb:
        proc = subprocess.run(st.command(usb.port, ["--role", "payer"]), capture_output=True, text=True,
                              env={**os.environ, "PAYTOKEN_KEY_PASSPHRASE": st.passphrase})
        assert usb.bytes == {"in": 0, "out": 0}  # the device was not touched
    assert proc.returncode == station.EXIT_CODES["issuer"] and "another issuer" in proc.stderr


# ---- faults over the pseudo-terminal: each a clear error, nothing half done ----

def test_wrong_or_absent_port(tmp_path, monkeypatch):
    st = SimStation(tmp_path / "station", FIRMWARE_BUILD)
    env = {**os.environ, "PAYTOKEN_KEY_PASSPHRASE": st.passphrase}
    proc = subprocess.run(st.command("/dev/paytoken-no-such-port", ["--role", "payer"]), capture_output=True,
                          text=True, env=env)
    assert proc.returncode == station.EXIT_CODES["port"] and "no such port" in proc.stderr
    # a port with nothing behind it (the bridge without a device): no answer, after the retries
    with UsbBridge() as usb:
        proc = subprocess.run(st.command(usb.port, ["--role", "payer", "--timeout", "0.5"]), capture_output=True,
                              text=True, env=env)
    assert proc.returncode == station.EXIT_CODES["no_answer"] and "did not answer" in proc.stderr
    assert not st.log.exists() or all("failed" in json.loads(x) for x in st.log.read_text().splitlines())

    class P:
        def __init__(self, device: str, vid: int | None, pid: int | None):
            self.device, self.vid, self.pid = device, vid, pid

    from serial.tools import list_ports

    for ports, expect in (([], "no ESP32 board found"), ([P("/dev/ttyS0", None, None)], "no ESP32 board found"),
                          ([P("/dev/ttyUSB0", 0x10C4, 0xEA60), P("/dev/ttyACM0", 0x303A, 0x1001)], "several")):
        monkeypatch.setattr(list_ports, "comports", lambda ports=ports: ports)
        with pytest.raises(station.StationError) as e:
            station.choose_port(None)
        assert e.value.kind == "port" and expect in e.value.message
    one = [P("/dev/ttyS0", None, None), P("/dev/ttyUSB3", 0x1A86, 0x7523)]
    monkeypatch.setattr(list_ports, "comports", lambda: one)
    assert station.choose_port(None) == "/dev/ttyUSB3"


def test_a_device_that_stops_answering_then_resumes(sim, tmp_path):
    auth = simdevice.Authority()
    st = _offline_station(auth)
    board = sim()
    board.power_on()
    spec = station.Spec(wire.ROLE_PAYEE, name="till")

    def freeze(step: str) -> None:
        if step == "keys":
            os.kill(board.device.proc.pid, signal.SIGSTOP)  # hangs: no answer, link still up

    with station.SerialLink(board.port, timeout=0.5, retries=1) as link:
        with pytest.raises(station.StationError) as e:
            st.provision(link, spec, after=freeze)
    assert e.value.kind == "no_answer" and station.EXIT_CODES["no_answer"] == 4
    os.kill(board.device.proc.pid, signal.SIGCONT)
    board.power_off()
    assert "provisioning not finalised" in loadable(board.image) or "missing" in loadable(board.image)
    board.power_on()
    with station.SerialLink(board.port, timeout=5) as link:
        res = st.provision(link, spec)
    assert res.resumed and loadable(board.image) == "ok"


@pytest.mark.parametrize("step", station.STEPS)
def test_cable_pulled_after_each_step_then_provision_py_resumes(sim, tmp_path, step):
    auth = simdevice.Authority()
    st = _offline_station(auth)
    ss = SimStation(tmp_path / "station", FIRMWARE_BUILD, auth=auth)
    board = sim()
    board.power_on()
    device_id = os.urandom(wire.ID_LEN)
    spec = station.Spec(wire.ROLE_PAYER, device_id=device_id, voucher=auth.voucher(device_id, 1, 7_000))

    class Pulled(Exception):
        pass

    def pull(s: str) -> None:
        if s == step:
            board.power_off()  # the device loses power, the cable is gone
            raise Pulled

    with station.SerialLink(board.port, timeout=5) as link, pytest.raises(Pulled):
        st.provision(link, spec, after=pull)
    after = loadable(board.image)
    if step == "finalise":
        assert after == "ok"
        return
    assert after != "ok"  # half provisioned: it cannot pay
    board.power_on()
    voucher = tmp_path / "voucher.hex"
    voucher.write_text(auth.voucher(device_id, 1, 7_000).hex())
    res = ss.run(board, ["--role", "payer", "--device-id", device_id.hex(), "--voucher", str(voucher)])
    assert res.returncode == 0, res.stderr
    assert res.device_id == device_id and res.record["balance"] == 7_000
    assert res.record["resumed"] == (step != "identify")
    board.wait_exit()
    assert loadable(board.image) == "ok"


def test_second_finalise_and_another_issuer_are_refused(sim, tmp_path):
    auth = simdevice.Authority()
    ss = SimStation(tmp_path / "station", FIRMWARE_BUILD, auth=auth)
    board = sim()
    board.power_on()
    first = ss.run(board, ["--role", "payee", "--name", "till"])
    assert first.returncode == 0, first.stderr
    board.wait_exit()
    before = read_store(board.image)
    # the finalised device, in its USB service (button held at power-on): provision.py again
    board.power_on(service=True)
    again = ss.run(board, ["--role", "payee"])
    assert again.returncode == station.EXIT_CODES["locked"] and "already provisioned" in again.stderr
    # a raw second FINALISE (and any other step) is refused by the device itself
    with station.SerialLink(board.port, timeout=5) as link:
        for rtype, payload in ((frames.T_FINALISE, first.device_id), (frames.T_KEYS, bytes(41))):
            with pytest.raises(station.StationError) as e:
                link.request(rtype, payload)
            assert e.value.kind == "locked" and "finalised" in e.value.message
    # a station of another issuer
    other = SimStation(tmp_path / "other", FIRMWARE_BUILD)
    res = other.run(board, ["--role", "payee"])
    assert res.returncode == station.EXIT_CODES["issuer"] and "another issuer" in res.stderr
    assert read_store(board.image) == before  # nothing changed


def test_a_tampered_certificate_is_refused_and_the_device_stays_unable_to_pay(sim, tmp_path):
    auth = simdevice.Authority()
    st = _offline_station(auth)
    board = sim()
    board.power_on()
    issue = st.issuer.issue

    def tampered(*a, **kw) -> bytes:
        cert = bytearray(issue(*a, **kw))
        cert[-70] ^= 0x01  # a limit changed after signing
        return bytes(cert)

    st.issuer.issue = tampered  # type: ignore[method-assign]
    spec = station.Spec(wire.ROLE_PAYER, name="card")
    with station.SerialLink(board.port, timeout=5) as link:
        with pytest.raises(station.StationError) as e:
            st.provision(link, spec)
        assert e.value.kind == "device" and "not signed by the issuer" in e.value.message
        assert json.loads(link.request(frames.T_IDENTIFY))["state"] == "keys"
        assert "cert.bin" not in read_store(board.image) and loadable(board.image) != "ok"
        st.issuer.issue = issue  # type: ignore[method-assign]
        res = st.provision(link, spec)
    assert res.resumed and board.wait_exit() == 0 and loadable(board.image) == "ok"


def test_batch_mode_provisions_devices_one_after_another(sim, tmp_path):
    ss = SimStation(tmp_path / "station", FIRMWARE_BUILD)
    board = sim()
    images = [tmp_path / "a.img", tmp_path / "b.img"]

    def production_line() -> None:  # the operator plugs in one blank board after the other
        for image in images:
            board.image = image
            board.power_on()
            board.wait_exit(60)

    line = threading.Thread(target=production_line, daemon=True)
    line.start()
    env = {**os.environ, "PAYTOKEN_KEY_PASSPHRASE": ss.passphrase}
    proc = subprocess.run(ss.command(board.port, ["--role", "payee", "--batch", "2", "--wait", "30"]),
                          capture_output=True, text=True, env=env, timeout=120)
    line.join(30)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(x) for x in ss.log.read_text().splitlines()]
    assert len(records) == 2 and len({r["device_id"] for r in records}) == 2
    assert [x.split()[0] for x in proc.stdout.splitlines()] == ["[1/2]", "[2/2]"]
    assert "[2/2] waiting for a device" in proc.stderr and "batch: 2 provisioned, 0 failed" in proc.stderr
    assert all(loadable(i) == "ok" for i in images)


def test_another_firmware_or_a_wrong_passphrase_is_refused_before_anything_is_made(sim, tmp_path):
    ss = SimStation(tmp_path / "station", FIRMWARE_BUILD)
    board = sim()
    board.power_on()
    other = tmp_path / "other-build" / "lib"
    other.mkdir(parents=True)
    (other / "x.mpy").write_bytes(b"another build")
    res = ss.run(board, ["--role", "payer", "--firmware", str(other.parent)])
    assert res.returncode == station.EXIT_CODES["firmware"] and "not the build" in res.stderr
    ss.passphrase = "not-the-passphrase"
    res = ss.run(board, ["--role", "payer"])
    assert res.returncode == station.EXIT_CODES["key"] and "wrong passphrase" in res.stderr
    with station.SerialLink(board.port, timeout=5) as link:
        assert json.loads(link.request(frames.T_IDENTIFY))["state"] == "blank"


def test_help_documents_every_exit_code_and_option():
    proc = subprocess.run([sys.executable, str(PROVISION), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for kind, code in station.EXIT_CODES.items():
        assert f"{code} {kind}" in proc.stdout, kind
    for opt in ("--port", "--flash", "--chip", "--deploy", "--role", "--issuer-key", "--backend", "--batch",
                "--log", "--operator", "PAYTOKEN_PROVISIONING_TOKEN"):
        assert opt in proc.stdout


def test_flashing_runs_esptool_and_mpremote_as_documented(tmp_path):
    calls: list[list[str]] = []

    def run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    for chip, offset in (("esp32", "0x1000"), ("esp32s3", "0x0"), ("esp32c3", "0x0")):
        calls.clear()
        station.flash_micropython("/dev/ttyUSB0", chip, tmp_path / "fw.bin", run=run)
        assert calls[0][-1] == "erase-flash" and calls[1][-3:] == ["-z", offset, str(tmp_path / "fw.bin")]
        assert calls[0][1:3] == ["-m", "esptool"] and ["--chip", chip] == calls[1][3:5]
    calls.clear()
    build = tmp_path / "build"
    (build / "board").mkdir(parents=True)
    (build / "board" / "board.json").write_text(json.dumps({"mip": ["ssd1306"]}))
    station.deploy_firmware("/dev/ttyUSB0", build, run=run)
    assert [c[1:5] for c in calls] == [["-m", "mpremote", "connect", "/dev/ttyUSB0"]] * 2
    assert calls[0][5:] == ["mip", "install", "ssd1306"] and calls[1][5:7] == ["romfs", "deploy"]


@pytest.mark.hardware
@pytest.mark.skipif(not os.environ.get("PAYTOKEN_ESP32_IMAGE"), reason="set PAYTOKEN_ESP32_IMAGE to a MicroPython "
                    "image for the board (and PAYTOKEN_ESP32_CHIP, default esp32) to flash it")
def test_flash_deploy_and_provision_a_real_board(request, tmp_path):
    """Erase, flash MicroPython (esptool), deploy the firmware (mpremote), provision: a blank board to a token."""
    port = request.config.getoption("--port")
    ss = SimStation(tmp_path / "station", FIRMWARE_BUILD)
    env = {**os.environ, "PAYTOKEN_KEY_PASSPHRASE": ss.passphrase}
    args = ["--role", "payer", "--timeout", "30", "--flash", os.environ["PAYTOKEN_ESP32_IMAGE"], "--chip",
            os.environ.get("PAYTOKEN_ESP32_CHIP", "esp32"), "--deploy", str(FIRMWARE_BUILD)]
    proc = subprocess.run(ss.command(port, args), capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("provisioned payer ")


@pytest.mark.hardware
def test_provision_a_real_board(request, tmp_path):
    """On an ESP32 with the firmware deployed (make deploy): provision.py against it (a test issuer, no backend)."""
    port = request.config.getoption("--port")
    ss = SimStation(tmp_path / "station", FIRMWARE_BUILD)
    env = {**os.environ, "PAYTOKEN_KEY_PASSPHRASE": ss.passphrase}
    proc = subprocess.run(ss.command(port, ["--role", "payee", "--timeout", "30"]), capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("provisioned payee ")
