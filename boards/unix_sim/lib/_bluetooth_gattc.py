# The GATT client's discovery procedures of the simulated `bluetooth` module (see bluetooth.py), as NimBLE
# runs them and MicroPython reports them. Imported by bluetooth on first use; not an API of its own.
from bluetooth import UUID, _g16, _u16
from micropython import const

_IRQ_GATTC_SERVICE_RESULT = const(9)
_IRQ_GATTC_SERVICE_DONE = const(10)
_IRQ_GATTC_CHARACTERISTIC_RESULT = const(11)
_IRQ_GATTC_CHARACTERISTIC_DONE = const(12)
_IRQ_GATTC_DESCRIPTOR_RESULT = const(13)
_IRQ_GATTC_DESCRIPTOR_DONE = const(14)
_EBUSY = const(16)
_HS_EBADDATA = const(10)
_ERR = const(0x01)
_FIND_INFO_REQ = const(0x04)
_FIND_INFO_RSP = const(0x05)
_FIND_TYPE_REQ = const(0x06)
_FIND_TYPE_RSP = const(0x07)
_READ_TYPE_REQ = const(0x08)
_READ_TYPE_RSP = const(0x09)
_READ_GROUP_REQ = const(0x10)
_READ_GROUP_RSP = const(0x11)
_P_SVC = const(1)
_P_CHR = const(2)
_P_DSC = const(3)
_U_SVC = b"\x00\x28"
_U_CHR = b"\x03\x28"


def rsp(b, c, q, op, p):
    # a response to discovery request q
    if op == _ERR:
        done(b, c, q, 0 if p[4] == 0x0A else 0x100 + p[4])  # "attribute not found" ends a discovery
    elif q[0] == _P_SVC:
        svc_rsp(b, c, q, op, p)
    elif q[0] == _P_CHR:
        chr_rsp(b, c, q, op, p)
    else:
        dsc_rsp(b, c, q, op, p)


def discover_services(b, conn_handle, uuid=None):
    if uuid is not None and not isinstance(uuid, UUID):
        raise TypeError("UUID")
    b._need()
    b._ensure()
    if uuid is None:
        pdu = bytes((_READ_GROUP_REQ,)) + _u16(1) + _u16(0xFFFF) + _U_SVC
    else:
        pdu = bytes((_FIND_TYPE_REQ,)) + _u16(1) + _u16(0xFFFF) + _U_SVC + bytes(uuid)
    b._proc(conn_handle, _P_SVC, pdu, [_P_SVC, 0, 0xFFFF, None if uuid is None else bytes(uuid)])


def discover_characteristics(b, conn_handle, start_handle, end_handle, uuid=None):
    if uuid is not None and not isinstance(uuid, UUID):
        raise TypeError("UUID")
    b._need()
    b._ensure()
    if b._chr:
        raise OSError(_EBUSY)  # MicroPython allows one characteristic discovery at a time
    ok = 0 < start_handle <= end_handle
    pdu = bytes((_READ_TYPE_REQ,)) + _u16(start_handle) + _u16(end_handle) + _U_CHR if ok else None
    u = None if uuid is None else bytes(uuid)
    b._proc(conn_handle, _P_CHR, pdu, [_P_CHR, start_handle - 1, end_handle, u, None])
    b._chr = True


def discover_descriptors(b, conn_handle, start_handle, end_handle):
    b._need()
    b._ensure()
    ok = 0 < start_handle + 1 <= end_handle
    pdu = bytes((_FIND_INFO_REQ,)) + _u16(start_handle + 1) + _u16(end_handle) if ok else None
    b._proc(conn_handle, _P_DSC, pdu, [_P_DSC, start_handle, end_handle])


def done(b, c, q, st):
    k = q[0]
    if k == _P_CHR:
        if q[4]:
            vh, props, u = q[4]
            q[4] = None
            b._call(_IRQ_GATTC_CHARACTERISTIC_RESULT, (c.h, q[2], vh, props, b._uuid(u)))
        b._chr = False
        b._end(c, _IRQ_GATTC_CHARACTERISTIC_DONE, (c.h, st))
    elif k == _P_SVC:
        b._end(c, _IRQ_GATTC_SERVICE_DONE, (c.h, st))
    else:
        b._end(c, _IRQ_GATTC_DESCRIPTOR_DONE, (c.h, st))


def svc_rsp(b, c, q, op, p):
    if op == _READ_GROUP_RSP and q[3] is None and p[1] >= 6:
        n = p[1]
        ents = [p[i : i + n] for i in range(2, len(p) - n + 1, n)]
    elif op == _FIND_TYPE_RSP and q[3] is not None:
        ents = [p[i : i + 4] + q[3] for i in range(1, len(p) - 3, 4)]
    else:
        ents = None
    if not ents:
        done(b, c, q, _HS_EBADDATA)
        return
    for e in ents:
        end = _g16(e, 2)
        if end <= q[1]:
            done(b, c, q, _HS_EBADDATA)
            return
        q[1] = end
        b._call(_IRQ_GATTC_SERVICE_RESULT, (c.h, _g16(e, 0), end, b._uuid(e[4:])))
    if q[1] == 0xFFFF:
        done(b, c, q, 0)
    elif op == _READ_GROUP_RSP:
        b._tx(c.h, bytes((_READ_GROUP_REQ,)) + _u16(q[1] + 1) + _u16(0xFFFF) + _U_SVC, 0)
    else:
        b._tx(c.h, bytes((_FIND_TYPE_REQ,)) + _u16(q[1] + 1) + _u16(0xFFFF) + _U_SVC + q[3], 0)


def chr_rsp(b, c, q, op, p):
    n = p[1] if op == _READ_TYPE_RSP else 0
    if n not in (7, 21):
        done(b, c, q, _HS_EBADDATA)
        return
    for i in range(2, len(p) - n + 1, n):
        dh, props, vh, u = _g16(p, i), p[i + 2], _g16(p, i + 3), p[i + 5 : i + n]
        if dh <= q[1]:
            done(b, c, q, _HS_EBADDATA)
            return
        if q[4]:
            pv, pp, pu = q[4]
            q[4] = None
            b._call(_IRQ_GATTC_CHARACTERISTIC_RESULT, (c.h, dh - 1, pv, pp, b._uuid(pu)))
        if q[3] is None or q[3] == u:
            q[4] = (vh, props, u)
        q[1] = vh
    if q[1] + 1 >= q[2] - 1:
        done(b, c, q, 0)
    else:
        b._tx(c.h, bytes((_READ_TYPE_REQ,)) + _u16(q[1] + 1) + _u16(q[2]) + _U_CHR, 0)


def dsc_rsp(b, c, q, op, p):
    n = (4 if p[1] == 1 else 18) if op == _FIND_INFO_RSP and len(p) > 2 else 0
    if not n:
        done(b, c, q, _HS_EBADDATA)
        return
    for i in range(2, len(p) - n + 1, n):
        h = _g16(p, i)
        if h <= q[1]:
            done(b, c, q, _HS_EBADDATA)
            return
        q[1] = h
        b._call(_IRQ_GATTC_DESCRIPTOR_RESULT, (c.h, h, b._uuid(p[i + 2 : i + n])))
    if q[1] >= q[2]:
        done(b, c, q, 0)
    else:
        b._tx(c.h, bytes((_FIND_INFO_REQ,)) + _u16(q[1] + 1) + _u16(q[2]), 0)


del const
