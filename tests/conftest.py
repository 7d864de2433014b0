"""Shared fixtures: the firmware is compiled once per run and served by real MicroPython processes."""

from __future__ import annotations

import pytest

from paytoken_host import fwbuild
from tests.harness.mp import FIRMWARE_BUILD, MicroPython


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--port", default=None, help="serial port of a real ESP32 for hardware tests")
    parser.addoption("--run-slow", action="store_true", help="also run the long variants (make test-long)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_hw = pytest.mark.skip(reason="needs a real device: pass --port")
    skip_slow = pytest.mark.skip(reason="long variant: run make test-long")
    for item in items:
        if "hardware" in item.keywords and not config.getoption("--port"):
            item.add_marker(skip_hw)
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)


@pytest.fixture(scope="session", autouse=True)
def firmware_build() -> None:
    """Tests run the compiled .mpy files, exactly what goes on the device."""
    fwbuild.build(FIRMWARE_BUILD)


@pytest.fixture(scope="session")
def mp(firmware_build: None):
    """A MicroPython unix-port process serving calls into the firmware (roomy heap, for correctness)."""
    with MicroPython(heapsize="1M") as proc:
        yield proc


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    from tests import wycheproof

    lines = wycheproof.summary_lines()
    if lines:
        terminalreporter.section("Wycheproof vectors checked against the firmware on MicroPython")
        for line in lines:
            terminalreporter.write_line(line)
