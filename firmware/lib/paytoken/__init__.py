# paytoken: firmware for offline payment tokens (ESP32, MicroPython).
# Layers depend downwards only: app -> protocol/ledger -> crypto; hardware sits at the edge in board drivers.
VERSION = "0.1.0"
