# Crypto core: pure MicroPython over hashlib.sha256 and cryptolib.aes (ECB), the only C crypto an ESP32 build has.
