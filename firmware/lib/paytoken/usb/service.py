# The USB serial service: reads request frames (paytoken.usb.frames) from a port, one at a time, hands each
# to the handler registered for its type and writes one response frame back. Handlers are objects with
#   TYPES                      the request types they answer
#   handle(rtype, payload)     -> response body (status OK), or raise Error(code, message)
#   stop                       after a response: a non-None value ends serve() with it (e.g. "restart")
# Provisioning (paytoken.provisioning) registers now; sync over USB (issue 9) registers its own types.
#
#   svc = Service(port); svc.register(handler); svc.serve() -> the stopping handler's value, or "closed"
#   svc.serve_one(idle_ms) -> None (one request answered, or none came), else as serve() (the app's USB watcher)
# port: read(n, ms) -> 1..n bytes or b"" after ms (-1: for ever), raises EOFError when the link is gone;
# write(data). A bad frame gets a T_BAD_FRAME response (status E_FRAME, the reason); a frame cut off
# mid-way (the station went away) is dropped silently.
from paytoken.usb import frames


class Error(Exception):
    def __init__(self, code, msg=""):
        super().__init__(msg)
        self.code = code
        self.msg = msg


class Service:
    def __init__(self, port, byte_ms=1000):
        self.port = port
        self.byte_ms = byte_ms
        self.handlers = {}
        self.requests = 0

    def register(self, handler):
        for t in handler.TYPES:
            if t in self.handlers:
                raise ValueError("usb: request type %d taken" % t)
            self.handlers[t] = handler

    def serve(self):
        while True:
            stop = self.serve_one(-1)
            if stop is not None:
                return stop

    def serve_one(self, idle_ms):
        # One request: None when nothing came within idle_ms or after a response (go on), else serve()'s value.
        port = self.port
        try:
            got = frames.read_frame(port, idle_ms, self.byte_ms)
        except frames.FrameError as e:
            if e.reason != "truncated":
                port.write(frames.response(frames.T_BAD_FRAME, frames.E_FRAME, e.reason.encode()))
            return None
        except EOFError:
            return "closed"
        if got is None:
            return None
        rtype, payload = got
        self.requests += 1
        handler = self.handlers.get(rtype)
        if handler is None or rtype & frames.RESPONSE:
            port.write(frames.response(rtype & 0x7F, frames.E_UNKNOWN, ("type %d" % rtype).encode()))
            return None
        try:
            body = handler.handle(rtype, payload)
            out = frames.response(rtype, frames.OK, body or b"")
        except Error as e:
            out = frames.response(rtype, e.code, e.msg.encode())
        except (OSError, MemoryError) as e:
            out = frames.response(rtype, frames.E_DEVICE, str(e).encode())
        port.write(out)
        return getattr(handler, "stop", None)
