"""Run firmware code on the real MicroPython unix port and talk to it from pytest (JSON lines)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from paytoken_host.fwbuild import micropython_command  # re-exported: the tests import it from here

ROOT = Path(__file__).resolve().parents[2]
SERVER = Path(__file__).with_name("mp_server.py")
# PAYTOKEN_FW_BUILD lets two test runs in one tree keep their builds apart.
FIRMWARE_BUILD = Path(os.environ.get("PAYTOKEN_FW_BUILD") or ROOT / "build" / "firmware").resolve()


def micropython_path(extra: list[Path] | None = None) -> str:
    """MICROPYPATH: the unix port's frozen modules, then the compiled firmware lib, then extras."""
    parts = [".frozen", str(FIRMWARE_BUILD / "lib"), str(FIRMWARE_BUILD)]
    parts += [str(p) for p in extra or []]
    return ":".join(parts)


HARNESS = Path(__file__).resolve().parent
ROMBOOT = HARNESS / "romboot"  # romboot.py alone: nothing else on the path may shadow the image


def romfs_image() -> Path:
    return FIRMWARE_BUILD / "romfs.img"


def heap_kb(heapsize: str) -> int:
    """'64K' / '2M' / '65536' -> KB."""
    units = {"K": 1, "M": 1024}
    if heapsize[-1].upper() in units:
        return int(heapsize[:-1]) * units[heapsize[-1].upper()]
    return int(heapsize) // 1024


@functools.cache
def romfs_with(modules: tuple[str, ...]) -> Path:
    """A ROMFS image of the built firmware plus these tests/harness modules compiled beside it in lib/: a
    harness script standing in for the application sits in the image as the application's code would."""
    import shutil

    from paytoken_host import fwbuild

    out = FIRMWARE_BUILD.parent / (FIRMWARE_BUILD.name + "-rom-" + "-".join(modules))
    if out.exists():
        shutil.rmtree(out)
    for name in fwbuild.ROMFS_DIRS:
        shutil.copytree(FIRMWARE_BUILD / name, out / name)
    for name in modules:
        fwbuild.compile_module(fwbuild.default_mpy_cross(), HARNESS / f"{name}.py", out / "lib" / f"{name}.mpy",
                               f"{name}.py")
    return fwbuild.make_romfs(out)


def romfs_heapsize(heapsize: str, image: Path | None = None) -> str:
    """The -X heapsize that leaves `heapsize` for the firmware once romboot has read the ROMFS image in.

    On the device the image is memory-mapped flash; on the unix port it has to sit in the heap, so what it
    takes there is added: its GC blocks of 4 words (32 bytes on a 64-bit build, 16 on a 32-bit one), the GC's
    3 bits of tables per block, and one block for the bytearray's header. The VfsRom object and the mount stay
    in the budget, as on the device.
    """
    size = (image or romfs_image()).stat().st_size
    block = word_bits(micropython_command()) // 2
    blocks = -(-size // block) + 1
    return str(heap_kb(heapsize) * 1024 + blocks * block + -(-blocks * 3 // 8))


def command(
    heapsize: str, *, module: str | None = None, source: str | None = None, args: tuple[str, ...] = (),
    romfs: bool = False, extra_path: list[Path] | None = None, image: Path | None = None,
) -> tuple[list[str], dict[str, str]]:
    """(argv, env) to run a module (found on extra_path, or tests/harness without romfs) or a source string.

    romfs=True runs the firmware in place from build/firmware/romfs.img mounted at /rom, as on an ESP32 with
    a romfs partition, and `heapsize` is then what the firmware gets beyond the image (romfs_heapsize);
    image replaces the firmware's own (the bench packs its stand-in for the application in with it).
    """
    if (module is None) == (source is None):
        raise ValueError("give module or source")
    if romfs:
        env = dict(os.environ, MICROPYPATH=":".join([".frozen", str(ROMBOOT), *map(str, extra_path or [])]),
                   PAYTOKEN_ROMFS=str(image or romfs_image()))
        body = f"import {module}" if module else source
        return [micropython_command(), "-X", f"heapsize={romfs_heapsize(heapsize, image)}", "-c",
                "import romboot\n" + body, *args], env
    env = dict(os.environ, MICROPYPATH=micropython_path([*(extra_path or []), HARNESS]))
    run = ["-m", module] if module else ["-c", source]
    return [micropython_command(), "-X", f"heapsize={heapsize}", *run, *args], env


FROZEN = os.environ.get("PAYTOKEN_FROZEN_MICROPYTHON")  # a unix port with the firmware frozen in (make frozen-unix)


def frozen_launcher(heap: str) -> tuple[list[str], dict[str, str]]:
    """main.py on the unix port with the firmware frozen in, as a production ESP32 image (paytoken_host.demo's
    Launcher): code, strings and constants in the binary, only live objects in the heap."""
    if not FROZEN:
        raise RuntimeError("set PAYTOKEN_FROZEN_MICROPYTHON to a unix port with the firmware frozen in")
    return [FROZEN, "-X", f"heapsize={heap}", "main.py"], dict(os.environ, MICROPYPATH=".frozen")


@functools.cache
def word_bits(micropython: str) -> int:
    """32 or 64: the pointer width of a MicroPython build (an ESP32's is 32: 4-byte pointers, 16-byte GC blocks;
    the same objects take up to twice the heap on a 64-bit build)."""
    out = subprocess.run([micropython, "-c", "import sys; print(64 if sys.maxsize > 1 << 32 else 32)"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
    return int(out)


def smallest_kb(fits, lo: int, hi: int) -> int | None:
    """The smallest heap size in KB (lo < size <= hi) for which fits(kb) is true, by bisection (fits must be
    monotonic, or made so: the bench repeats runs); None if even hi does not fit."""
    if not fits(hi):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


class MicroPythonError(Exception):
    """An exception raised by firmware code, with the MicroPython exception's type name."""

    def __init__(self, kind: str, msg: str):
        super().__init__(f"{kind}: {msg}")
        self.kind = kind
        self.msg = msg


def _enc(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"$b": bytes(v).hex()}
    if isinstance(v, (list, tuple)):
        return [_enc(x) for x in v]
    if isinstance(v, dict):
        return {k: _enc(x) for k, x in v.items()}
    return v


def _dec(v: Any) -> Any:
    if isinstance(v, dict):
        if "$b" in v:
            return bytes.fromhex(v["$b"])
        return {k: _dec(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_dec(x) for x in v]
    return v


def _result(reply: dict) -> Any:
    if "err" in reply:
        raise MicroPythonError(reply["err"], reply["msg"])
    return _dec(reply["ok"])


class MicroPython:
    """One `micropython` process serving calls into the firmware package.

    heapsize is passed as -X heapsize= so the firmware runs within a device's RAM budget.
    """

    def __init__(self, heapsize: str = "512K", extra_path: list[Path] | None = None, romfs: bool = False):
        self.heapsize = heapsize
        if romfs:
            argv, env = command(heapsize, module="mp_server", romfs=True, extra_path=[*(extra_path or []), HARNESS])
        else:
            argv = [micropython_command(), "-X", f"heapsize={heapsize}", str(SERVER)]
            env = dict(os.environ, MICROPYPATH=micropython_path(extra_path))
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(ROOT),
        )
        self.log: list[str] = []

    def request(self, req: dict) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                stderr = self.proc.stderr.read() if self.proc.stderr else ""
                raise RuntimeError(f"micropython exited ({self.proc.poll()}): {stderr.strip()}")
            if line.startswith("@@ "):
                return json.loads(line[3:])
            self.log.append(line.rstrip("\n"))

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call firmware function `name` (dotted path) and return its result; raise MicroPythonError."""
        return _result(self.request({"call": name, "args": _enc(args), "kwargs": _enc(kwargs)}))

    def map(self, name: str, argsets: list[tuple | list]) -> list[tuple[bool, Any]]:
        """Call `name` once per argument list; each outcome is (True, result) or (False, "Kind: msg").

        Requests are sent in chunks of about MAP_CHUNK bytes so the device-side JSON stays small.
        """
        outcomes: list[tuple[bool, Any]] = []
        chunk: list[Any] = []
        size = 0
        for args in argsets:
            encoded = _enc(list(args))
            chunk.append(encoded)
            size += len(json.dumps(encoded))
            if size >= self.MAP_CHUNK:
                outcomes += self._map_chunk(name, chunk)
                chunk, size = [], 0
        if chunk:
            outcomes += self._map_chunk(name, chunk)
        return outcomes

    MAP_CHUNK = 16384

    def _map_chunk(self, name: str, chunk: list[Any]) -> list[tuple[bool, Any]]:
        replies = _result(self.request({"map": name, "argsets": chunk}))
        return [
            (True, _dec(r["ok"])) if "ok" in r else (False, f"{r['err']}: {r['msg']}") for r in replies
        ]

    def exec(self, source: str) -> None:
        _result(self.request({"exec": source}))

    def eval(self, expr: str) -> Any:
        return _result(self.request({"eval": expr}))

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> MicroPython:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_script(source: str, heapsize: str = "512K", timeout: float = 120, romfs: bool = False
               ) -> subprocess.CompletedProcess:
    """Run a standalone MicroPython script with the firmware on its path (used for memory budgets)."""
    argv, env = command(heapsize, source=source, romfs=romfs)
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=timeout,
    )
