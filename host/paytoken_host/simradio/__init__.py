"""Simulated BLE radio: a broker process that joins MicroPython unix-port devices (and CPython clients) as if
they were ESP32s talking BLE GATT over the air. Protocol, timing model and differences: docs/simulator.md, "Radio".
"""

from .broker import Broker, BrokerError, BrokerThread, RadioConfig
from .client import AdvReport, Characteristic, Connection, Descriptor, RadioClient, RadioError, Service

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
