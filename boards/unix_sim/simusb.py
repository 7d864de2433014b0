# The unix_sim board's USB serial link (board.usb()), loaded when first called: a TCP connection to the
# host's USB-UART bridge (paytoken_host.simusb), which gives the station a pseudo-terminal.


class SimUsb:
    # board.usb(): what the firmware's USB service needs of a board (the ESP32 boards' is
    # paytoken.drivers.esp32_usb.Usb). service: the button held at power-on (PAYTOKEN_SIM_SERVICE=1).
    chip = "none"

    def __init__(self, address, service=False):
        self.address = address
        self.service = service

    def service_requested(self):
        return self.service

    def port(self):
        return SimUSB(self.address)

    def rng_entropy(self):
        return None  # the host's getrandom needs no radio

    def reset(self):
        pass  # the process ends after main.py; the harness starts it again, as the chip would boot


class SimUSB:
    # The device's side of its USB serial link: a TCP connection to the host's USB-UART bridge
    # (paytoken_host.simusb), which gives the station a pseudo-terminal. Same interface as
    # paytoken.usb.stdio.StdioPort: read(n, ms) -> 1..n bytes, b"" after ms; EOFError when the bridge is gone.
    def __init__(self, address):
        import select
        import socket

        host, _, port = address.rpartition(":")
        self.sock = socket.socket()
        self.sock.connect(socket.getaddrinfo(host or "127.0.0.1", int(port))[0][-1])
        self._poll = select.poll()
        self._poll.register(self.sock, select.POLLIN)

    def read(self, n, ms):
        if not self._poll.poll(ms):
            return b""
        data = self.sock.recv(n)
        if not data:
            raise EOFError("usb: the bridge closed the link")
        return data

    def write(self, data):
        mv = memoryview(data)
        while mv:
            k = self.sock.send(mv)
            mv = mv[k:]
