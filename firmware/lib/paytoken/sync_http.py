# The Wi-Fi transport of the sync client: each sealed message 1 POSTed by the device itself to the backend's
# /v1/sync over HTTP/1.1, message 2 read back (docs/protocol.md section 10). Plain HTTP on purpose: the exchange is
# end-to-end encrypted and authenticated by its Noise handshake, and TLS beside a BLE stack runs an ESP32 out of
# memory (MicroPython issue 7038). Needs only the `socket` module (the unix port's loopback network in the
# simulator, network.WLAN on a board).
import socket

from paytoken.sync_client import SyncError

_MAX_ANSWER = 65535  # a Noise message


def poster(url, timeout_s=15):
    # post(msg1) -> msg2 for SyncClient.sync_over, to the backend at url ("http://host:port"). OSError when the
    # network or the backend's front fails (sync_over tries again); SyncError(final) when the backend refuses
    # message 1 (4xx: e.g. the device holds another backend's sync key).
    if not url.startswith("http://"):
        raise SyncError("backend url: http://host[:port] (the exchange is sealed end to end)", True)
    host, _, port = url[7:].rstrip("/").partition(":")
    port = int(port or 80)
    addr = socket.getaddrinfo(host, port)[0][-1]
    head = "POST /v1/sync HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/octet-stream\r\n" \
           "Connection: close\r\nContent-Length: " % (host, port)

    def post(msg):
        s = socket.socket()
        try:
            s.settimeout(timeout_s)
            s.connect(addr)
            s.write((head + "%d\r\n\r\n" % len(msg)).encode())
            s.write(msg)
            status = s.readline().split()
            if len(status) < 2 or not status[0].startswith(b"HTTP/"):
                raise OSError("sync: not an HTTP answer")
            code = int(status[1])
            length = None
            while True:
                line = s.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length is None or not 0 <= length <= _MAX_ANSWER:
                raise OSError("sync: answer without a usable Content-Length")
            body = _read(s, length)
        finally:
            s.close()
        if code == 200:
            return body
        if 400 <= code < 500 and code != 429:
            raise SyncError("backend refused message 1 (%d): %s" % (code, body[:200]), True)
        raise OSError("sync: HTTP %d" % code)

    return post


def _read(s, n):
    buf = bytearray(n)
    mv = memoryview(buf)
    got = 0
    while got < n:
        k = s.readinto(mv[got:])
        if not k:
            raise OSError("sync: answer cut short")
        got += k
    return bytes(buf)
