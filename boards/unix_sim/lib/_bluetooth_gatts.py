# The GATT server of the simulated `bluetooth` module (see bluetooth.py): registers services as NimBLE lays
# them out and answers the peer's ATT requests. Imported by bluetooth on first use; not an API of its own.
from bluetooth import UUID, _g16, _u16
from micropython import const

_FLAG_READ = const(0x0002)
_FLAG_WRITE_NO_RESPONSE = const(0x0004)
_FLAG_WRITE = const(0x0008)
_FLAG_NOTIFY = const(0x0010)
_FLAG_INDICATE = const(0x0020)
_IRQ_GATTS_WRITE = const(3)
_IRQ_GATTS_READ_REQUEST = const(4)
_IRQ_MTU_EXCHANGED = const(21)
_EBUSY = const(16)
_E2BIG = const(7)
_MTU_MIN = const(23)
_MAX_SVCS = const(8)  # MP_BLUETOOTH_NIMBLE_MAX_SERVICES
_ATTR_LEN = const(20)  # MP_BLUETOOTH_DEFAULT_ATTR_LEN
_ERR = const(0x01)
_MTU_REQ = const(0x02)
_MTU_RSP = const(0x03)
_FIND_INFO_REQ = const(0x04)
_FIND_INFO_RSP = const(0x05)
_FIND_TYPE_REQ = const(0x06)
_FIND_TYPE_RSP = const(0x07)
_READ_TYPE_REQ = const(0x08)
_READ_REQ = const(0x0A)
_READ_BLOB_REQ = const(0x0C)
_READ_GROUP_REQ = const(0x10)
_WRITE_REQ = const(0x12)
_WRITE_RSP = const(0x13)
_WRITE_CMD = const(0x52)
_K_SVC = const(0)
_K_CHR = const(1)
_K_VAL = const(2)
_K_CCC = const(3)
_K_DSC = const(4)
_U_SVC = b"\x00\x28"
_U_CHR = b"\x03\x28"
_U_CCC = b"\x02\x29"


def register(b, services):
    b._need()
    if b._adv or b._scan or b._connecting or b._conns:
        raise OSError(_EBUSY)  # ble_gatts_reset: only while no GAP procedure and no connection
    b._gatts_reset()
    try:
        return _register(b, services)
    except BaseException:
        b._gatts_reset()  # no half-built table behind a refused definition
        raise


def _register(b, services):
    attrs = b._attrs
    db = b._db
    result = []
    for svc in services:
        if len(svc) != 2:
            raise ValueError("requested length 2 but object has length %d" % len(svc))
        u, chars = svc
        if not isinstance(u, UUID):
            raise ValueError("invalid service UUID")
        if b._nsvc == _MAX_SVCS:
            raise OSError(_E2BIG)
        b._nsvc += 1
        first = len(attrs)
        attrs.append(None)
        handles = []
        for ch in chars:
            if len(ch) < 2 or len(ch) > 3:
                raise ValueError("invalid characteristic tuple")
            if not isinstance(ch[0], UUID):
                raise ValueError("invalid characteristic UUID")
            cu = bytes(ch[0])
            f = int(ch[1])
            vh = len(attrs) + 2
            attrs.append((_K_CHR, cu, f & 0x7F | (0x80 if f & 0x0180 else 0), vh))
            attrs.append((_K_VAL, cu, f, 0))
            db[vh] = [bytearray(_ATTR_LEN), 0, False]
            handles.append(vh)
            if f & (_FLAG_NOTIFY | _FLAG_INDICATE):
                attrs.append((_K_CCC, _U_CCC, vh, 0))
            if len(ch) == 3:
                for d in ch[2]:
                    if len(d) != 2:
                        raise ValueError("requested length 2 but object has length %d" % len(d))
                    if not isinstance(d[0], UUID):
                        raise ValueError("invalid descriptor UUID")
                    attrs.append((_K_DSC, bytes(d[0]), int(d[1]), 0))
                    db[len(attrs)] = [bytearray(_ATTR_LEN), 0, False]
                    handles.append(len(attrs))
        attrs[first] = (_K_SVC, bytes(u), len(attrs), 0)
        result.append(tuple(handles))
    return tuple(result)


def attr(b, h):
    return b._attrs[h - 1] if 0 < h <= len(b._attrs) else None


def atype(b, a):
    k = a[0]
    return _U_SVC if k == _K_SVC else _U_CHR if k == _K_CHR else a[1]


def read(b, c, h):
    # (value, 0) or (None, ATT error) for a read of attribute h by the peer on connection c
    a = attr(b, h)
    if a is None:
        return None, 0x01
    k = a[0]
    if k == _K_SVC:
        return a[1], 0
    if k == _K_CHR:
        return bytes((a[2],)) + _u16(a[3]) + a[1], 0
    if k == _K_CCC:
        return _u16(c.cccd.get(a[2], 0)), 0
    f = a[2]
    if not f & _FLAG_READ:
        return None, 0x02
    if k == _K_VAL:
        if f & 0x0200:
            return None, 0x0F  # READ_ENCRYPTED: the simulated links are never encrypted
        if f & 0x0400:
            return None, 0x05
        if f & 0x0800:
            return None, 0x08
        if h == 3:
            return bytes(b._name), 0
        if h == 5:
            return b"\x00\x00", 0
    r = b._call(_IRQ_GATTS_READ_REQUEST, (c.h, h))
    r = 1 if r is True else r if isinstance(r, int) and r is not False else 0
    if r:
        return None, r & 0xFF
    e = b._db.get(h)
    if e is None:
        return None, 0x0A
    return bytes(e[0][: e[1]]), 0


def write(b, c, h, v):
    a = attr(b, h)
    if a is None:
        return 0x01
    k = a[0]
    if k == _K_CCC:
        if len(v) != 2:
            return 0x0D
        c.cccd[a[2]] = v[0] | v[1] << 8
        return 0
    if k != _K_VAL and k != _K_DSC:
        return 0x03
    f = a[2]
    if not f & (_FLAG_WRITE | _FLAG_WRITE_NO_RESPONSE):
        return 0x03
    if k == _K_VAL:
        if f & 0x1000:
            return 0x0F
        if f & 0x2000:
            return 0x05
        if f & 0x4000:
            return 0x08
    e = b._db.get(h)
    if e is None:
        return 0x0A
    buf = e[0]
    off = e[1] if e[2] else 0
    n = min(len(buf), len(v) + off)  # a longer write is cut to the buffer
    buf[off:n] = v[: n - off]
    e[1] = n
    b._call(_IRQ_GATTS_WRITE, (c.h, h))
    return 0


def srv(b, c, op, p):
    # the ATT server: answer one request (or take one command) from the peer
    if op == _MTU_REQ:
        b._tx(c.h, bytes((_MTU_RSP,)) + _u16(b._mtu), 0)
        c.mtu = max(_MTU_MIN, min(b._mtu, _g16(p, 1)))
        c.mtx = True
        b._call(_IRQ_MTU_EXCHANGED, (c.h, c.mtu))
        return
    if op == _WRITE_REQ or op == _WRITE_CMD:
        h = _g16(p, 1)
        e = write(b, c, h, p[3:])
        if op == _WRITE_REQ:
            b._tx(c.h, bytes((_ERR, op)) + _u16(h) + bytes((e,)) if e else bytes((_WRITE_RSP,)), 0)
        return
    if op & 0x40:
        return  # an unknown command: ignored
    rsp, h, e = answer(b, c, op, p)
    b._tx(c.h, rsp if rsp else bytes((_ERR, op)) + _u16(h) + bytes((e,)), 0)


def answer(b, c, op, p):
    # (response, handle, 0) or (None, handle, ATT error)
    if op == _READ_REQ or op == _READ_BLOB_REQ:
        h = _g16(p, 1)
        v, e = read(b, c, h)
        if e:
            return None, h, e
        off = _g16(p, 3) if op == _READ_BLOB_REQ else 0
        if off > len(v):
            return None, h, 0x07
        return bytes((op + 1,)) + v[off : off + c.mtu - 1], h, 0
    if op not in (_FIND_INFO_REQ, _FIND_TYPE_REQ, _READ_TYPE_REQ, _READ_GROUP_REQ):
        return None, 0, 0x06  # request not supported
    s, end = _g16(p, 1), _g16(p, 3)
    if s == 0 or s > end:
        return None, s, 0x01
    if op == _READ_GROUP_REQ and p[5:] != _U_SVC:
        return None, s, 0x10  # unsupported group type
    out = []
    size = 0
    room = c.mtu - 2
    for h in range(s, min(end, len(b._attrs)) + 1):
        a = b._attrs[h - 1]
        if op == _FIND_INFO_REQ:
            ent = _u16(h) + atype(b, a)
        elif op == _READ_GROUP_REQ:
            if a[0] != _K_SVC:
                continue
            ent = _u16(h) + _u16(a[2]) + a[1]
        elif op == _FIND_TYPE_REQ:
            if a[0] != _K_SVC or _g16(p, 5) != 0x2800 or a[1] != p[7:]:
                continue
            ent = _u16(h) + _u16(a[2])
            room = c.mtu - 1
        else:
            if atype(b, a) != p[5:]:
                continue
            v, e = read(b, c, h)
            if e:
                if out:
                    break
                return None, h, e
            ent = _u16(h) + v[: min(253, c.mtu - 4)]
        if size and len(ent) != size:
            break  # every entry of one response has the same length
        if (len(out) + 1) * len(ent) > room:
            break
        size = len(ent)
        out.append(ent)
    if not out:
        return None, s, 0x0A  # attribute not found
    if op == _FIND_TYPE_REQ:
        return bytes((_FIND_TYPE_RSP,)) + b"".join(out), s, 0
    if op == _FIND_INFO_REQ:
        return bytes((_FIND_INFO_RSP, 1 if size == 4 else 2)) + b"".join(out), s, 0
    return bytes((op + 1, size)) + b"".join(out), s, 0


del const
