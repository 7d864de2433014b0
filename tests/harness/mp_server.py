# Runs on the MicroPython unix port: answers the test harness's requests, one JSON line each.
# Request:  {"call": "pkg.mod.fn", "args": [...], "kwargs": {...}}
#           {"map": "pkg.mod.fn", "argsets": [[...], ...]}  (one result per argument list)
#           {"exec": "source"}  /  {"eval": "expression"}   (in one namespace kept between requests)
# Bytes travel as {"$b": "hex"}. Replies start with "@@ " so firmware prints can't be mistaken for them.
import gc
import json
import sys
from binascii import hexlify, unhexlify

_ns = {}


def dec(v):
    if isinstance(v, dict):
        if "$b" in v:
            return unhexlify(v["$b"])
        return {k: dec(x) for k, x in v.items()}
    if isinstance(v, list):
        return [dec(x) for x in v]
    return v


def enc(v):
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"$b": hexlify(v).decode()}
    if isinstance(v, (list, tuple)):
        return [enc(x) for x in v]
    if isinstance(v, dict):
        return {k: enc(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return {"$repr": repr(v)}


def resolve(name):
    mod, _, fn = name.rpartition(".")
    m = __import__(mod)
    for part in mod.split(".")[1:]:
        m = getattr(m, part)
    return getattr(m, fn)


def err(e):
    return {"err": type(e).__name__, "msg": str(e)}


def call(fn, args, kwargs):
    try:
        return {"ok": enc(fn(*args, **kwargs))}
    except Exception as e:  # the harness reports every failure to the test, which decides
        return err(e)


def handle(req):
    if "call" in req:
        return call(resolve(req["call"]), dec(req.get("args", [])), dec(req.get("kwargs", {})))
    if "map" in req:
        fn = resolve(req["map"])
        out = []
        for a in req["argsets"]:
            out.append(call(fn, dec(a), {}))
            gc.collect()
        return {"ok": out}
    if "exec" in req:
        exec(req["exec"], _ns)
        return {"ok": None}
    if "eval" in req:
        return {"ok": enc(eval(req["eval"], _ns))}
    raise ValueError("unknown request")


def main():
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        try:
            reply = handle(json.loads(line))
        except Exception as e:
            reply = err(e)
        line = None
        gc.collect()
        sys.stdout.write("@@ ")
        sys.stdout.write(json.dumps(reply))
        sys.stdout.write("\n")


main()
