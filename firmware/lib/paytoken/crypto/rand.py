# The one source of randomness for keys, nonces and challenges.
# os.urandom is the ESP32's hardware RNG (esp_fill_random): truly random while Wi-Fi or BLE runs,
# see docs/security.md. On the unix port it is the kernel's getrandom.
import os


def random_bytes(n):
    if n < 0:
        raise ValueError("negative length")
    return os.urandom(n)


def random_scalar(order):
    # Uniform in [1, order-1] by rejection: no modulo bias.
    nbytes = 0
    t = order
    while t:  # MicroPython ints have no bit_length()
        t >>= 8
        nbytes += 1
    while True:
        k = int.from_bytes(os.urandom(nbytes), "big")
        if 0 < k < order:
            return k
