"""The simulated USB-UART bridge: a pseudo-terminal the station opens with pyserial like a real port
(/dev/pts/N), joined to a simulated device's USB serial (the unix_sim board's SimUSB connects to it over
loopback TCP: PAYTOKEN_SIM_USB=host:port). Bytes go both ways paced at the baud rate (10 bits a byte), so
timings and byte counts are those of a real 115200 baud link; every byte can be recorded (the transcript).

    with UsbBridge(baud=115200) as usb:
        env = {"PAYTOKEN_SIM_USB": usb.address}     # for the device process
        serial.Serial(usb.port)                     # for the station
        usb.transcript                              # [(direction "in" (to the device) | "out", bytes)]

Like a USB-UART bridge chip, the port stays while the device restarts: bytes written while no device is
connected are lost, and a new device connection replaces the old one. Reused by sync over serial (issue 9).
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
import tty


class UsbBridge:
    def __init__(self, baud: int = 115200, record: bool = True, host: str = "127.0.0.1"):
        self.baud = baud
        self.record = record
        self.transcript: list[tuple[str, bytes]] = []
        self.bytes = {"in": 0, "out": 0}  # in: station -> device, out: device -> station
        self._master, self._slave = os.openpty()
        tty.setraw(self._master)
        tty.setraw(self._slave)
        self.port = os.ttyname(self._slave)
        self._server = socket.create_server((host, 0))
        self.address = f"{host}:{self._server.getsockname()[1]}"
        self._dev: socket.socket | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.connected = threading.Event()
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._accept, self._to_device)]
        for t in self._threads:
            t.start()

    def _pace(self, n: int) -> None:
        if self.baud:
            time.sleep(n * 10 / self.baud)

    def _note(self, direction: str, data: bytes) -> None:
        with self._lock:
            self.bytes[direction] += len(data)
            if self.record:
                self.transcript.append((direction, data))

    def _accept(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self._server], [], [], 0.1)
            if not r:
                continue
            conn, _ = self._server.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                old, self._dev = self._dev, conn
            if old is not None:
                old.close()
            self.connected.set()
            threading.Thread(target=self._from_device, args=(conn,), daemon=True).start()

    def _from_device(self, conn: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                r, _, _ = select.select([conn], [], [], 0.1)
                if not r:
                    continue
                data = conn.recv(256)
            except (OSError, ValueError):
                break
            if not data:
                break
            self._pace(len(data))
            self._note("out", data)
            os.write(self._master, data)
        with self._lock:
            if self._dev is conn:
                self._dev = None
                self.connected.clear()
        conn.close()

    def _to_device(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self._master], [], [], 0.1)
            if not r:
                continue
            try:
                data = os.read(self._master, 256)
            except OSError:
                continue
            self._pace(len(data))
            with self._lock:
                dev = self._dev
            if dev is None:
                continue  # no device behind the bridge: the bytes are lost, as on a UART with the chip off
            self._note("in", data)
            try:
                dev.sendall(data)
            except OSError:
                pass

    def wait_device(self, timeout: float = 30) -> bool:
        return self.connected.wait(timeout)

    def drop_device(self) -> None:
        """Cuts the device's side (the cable pulled on the device end)."""
        with self._lock:
            dev, self._dev = self._dev, None
            self.connected.clear()
        if dev is not None:
            dev.close()

    def raw(self, direction: str | None = None) -> bytes:
        with self._lock:
            return b"".join(d for k, d in self.transcript if direction in (None, k))

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        self.drop_device()
        self._server.close()
        for fd in (self._master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> UsbBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
