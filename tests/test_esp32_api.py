"""Every module and name the firmware imports exists in a stock ESP32 MicroPython build.

Checked against the published ESP32 port stubs (micropython-esp32-esp32-generic-stubs) and their
MicroPython stdlib stubs, so code that only runs here because the unix port has more cannot land.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(sysconfig.get_paths()["purelib"])
STUB_ROOTS = [SITE, SITE / "stdlib"]
FIRMWARE_FILES = sorted((ROOT / "firmware").rglob("*.py"))
OWN_PACKAGES = {"paytoken", "board"}
# micropython-lib packages a board installs with mip at deploy (boards/*/board.json "mip"): not in the
# stock build, but on every device whose board lists them.
# MicroPython's asyncio (extmod/asyncio: core.py and the lazy names of __init__.py) is a small subset of
# CPython's, while the stub package gathers a hand-edited CPython stub: only these names count.
MICROPYTHON_ASYNCIO = frozenset(
    "CancelledError TimeoutError sleep sleep_ms create_task run run_until_complete get_event_loop current_task "
    "new_event_loop Loop Task TaskQueue wait_for wait_for_ms gather Event ThreadSafeFlag Lock open_connection "
    "start_server StreamReader StreamWriter".split()
)
MIP_PACKAGES = {pkg for f in (ROOT / "boards").glob("*/board.json") for pkg in json.loads(f.read_text()).get("mip", [])}


@cache
def stub_file(module: str) -> Path | None:
    rel = Path(*module.split("."))
    for root in STUB_ROOTS:
        for candidate in (root / f"{rel}.pyi", root / rel / "__init__.pyi"):
            if candidate.exists():
                return candidate
    return None


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str | None:
    """The module a stub's `from X import` names: relative ones (`from .locks import *` in a package's
    __init__.pyi, as the asyncio stubs are written) resolved against the stub's own package."""
    if not node.level:
        return node.module
    package = module.split(".") if path.name == "__init__.pyi" else module.split(".")[:-1]
    if node.level > 1:
        package = package[: 1 - node.level]
    return ".".join(package + ([node.module] if node.module else []))


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Module-level statements, those under `if sys.version_info ...` / `if sys.platform ...` included."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If):
            out += _top_level(node.body) + _top_level(node.orelse)
        else:
            out.append(node)
    return out


@cache
def stub_names(module: str) -> frozenset[str]:
    path = stub_file(module)
    assert path is not None
    names: set[str] = set()
    for node in _top_level(ast.parse(path.read_text()).body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*" and isinstance(node, ast.ImportFrom):
                    source = _absolute(module, path, node)
                    if source and source != module and stub_file(source):
                        names |= stub_names(source)
                else:
                    names.add(alias.asname or alias.name.split(".")[0])
    return frozenset(names)


def external_uses(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name or None) for every import of a non-firmware module and module.attr use."""
    tree = ast.parse(path.read_text())
    uses: list[tuple[int, str, str | None]] = []
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] not in OWN_PACKAGES:
                    uses.append((node.lineno, alias.name, None))
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in OWN_PACKAGES:
                for alias in node.names:
                    uses.append((node.lineno, node.module, alias.name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            uses.append((node.lineno, aliases[node.value.id], node.attr))
    return uses


def test_firmware_files_found():
    assert any(p.name == "p256.py" for p in FIRMWARE_FILES)
    assert MIP_PACKAGES == {"ssd1306"}  # the only mip package: the SSD1306 boards' display driver


@pytest.mark.parametrize("path", FIRMWARE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_firmware_uses_only_esp32_api(path: Path):
    missing = []
    for line, module, name in external_uses(path):
        if module in MIP_PACKAGES:
            continue
        if stub_file(module) is None:
            missing.append(f"line {line}: module {module!r} is not in the ESP32 build")
        elif name is not None and (
            name not in stub_names(module) or (module == "asyncio" and name not in MICROPYTHON_ASYNCIO)
        ):
            missing.append(f"line {line}: {module}.{name} is not in the ESP32 build")
    assert not missing, "\n".join(missing)


def test_checker_catches_unix_only_api(tmp_path: Path):
    bad = tmp_path / "bad.py"
    bad.write_text("import ffi\nfrom hashlib import sha512\nimport cryptolib\ncryptolib.aes\n")
    found = {(m, n) for _, m, n in external_uses(bad)}
    assert {("ffi", None), ("hashlib", "sha512"), ("cryptolib", "aes")} <= found
    assert stub_file("ffi") is None  # unix-only: would be reported
    assert "sha512" not in stub_names("hashlib")  # the ESP32 build has no SHA-512
    assert "sha256" in stub_names("hashlib") and "aes" in stub_names("cryptolib")
    # asyncio's stub is a package of `from .x import *`: followed, so its names are known, and only those
    assert {"run", "Event", "TimeoutError", "sleep_ms", "wait_for_ms"} <= stub_names("asyncio")
    assert "no_such_thing" not in stub_names("asyncio")


def test_asyncio_names_are_micropython_ones():
    # CPython-only names of the asyncio stub are kept out: MicroPython's asyncio does not have them.
    names = stub_names("asyncio")
    assert {"ThreadSafeFlag", "wait_for_ms", "create_task", "Event", "TimeoutError"} <= names & MICROPYTHON_ASYNCIO
    assert "Queue" in names and "Queue" not in MICROPYTHON_ASYNCIO
