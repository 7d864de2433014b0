"""Simulated BLE radio: a broker process that joins MicroPython unix-port devices (and CPython clients) as if
they were ESP32s talking BLE GATT over the air. Protocol, timing model and differences: docs/simulator.md, "Radio".
"""

from typing import Any

from .client import AdvReport, Characteristic, Connection, Descriptor, RadioClient, RadioError, Service

_BROKER_NAMES = {"Broker", "BrokerError", "BrokerThread", "RadioConfig"}


def __getattr__(name: str) -> Any:
    # The broker is imported on first use, so `python -m paytoken_host.simradio.broker` runs it fresh.
    if name in _BROKER_NAMES:
        from . import broker

        return getattr(broker, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdvReport",
    "Broker",
    "BrokerError",
    "BrokerThread",
    "Characteristic",
    "Connection",
    "Descriptor",
    "RadioClient",
    "RadioConfig",
    "RadioError",
    "Service",
]
