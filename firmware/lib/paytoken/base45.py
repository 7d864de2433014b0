# Base45 (RFC 9285): bytes as text in the QR alphanumeric alphabet, 3 characters per 2 bytes, so a QR code
# can carry binary data in alphanumeric mode and UART scanners and phone apps pass it on as plain text.
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"


def encoded_length(nbytes):
    return nbytes // 2 * 3 + (nbytes & 1) * 2


def encode(data):
    a = ALPHABET
    out = []
    n = len(data)
    for i in range(0, n - 1, 2):
        v = data[i] * 256 + data[i + 1]
        out.append(a[v % 45] + a[v // 45 % 45] + a[v // 2025])
    if n & 1:
        v = data[n - 1]
        out.append(a[v % 45] + a[v // 45])
    return "".join(out)


def decode(text):
    # ValueError for characters outside the alphabet, a dangling single character, or a group whose
    # value does not fit its bytes (RFC 9285 section 4.2: such input must be rejected).
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode()
    n = len(text)
    if n % 3 == 1:
        raise ValueError("base45: bad length")
    out = bytearray(n // 3 * 2 + (1 if n % 3 else 0))
    find = ALPHABET.find
    j = 0
    for i in range(0, n, 3):
        group = text[i:i + 3]
        v = 0
        scale = 1
        for ch in group:
            d = find(ch)
            if d < 0:
                raise ValueError("base45: bad character")
            v += d * scale
            scale *= 45
        if len(group) == 3:
            if v > 0xFFFF:
                raise ValueError("base45: group out of range")
            out[j] = v >> 8
            out[j + 1] = v & 0xFF
            j += 2
        else:
            if v > 0xFF:
                raise ValueError("base45: group out of range")
            out[j] = v
            j += 1
    return bytes(out)
