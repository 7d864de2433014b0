# QR code encoder (ISO/IEC 18004) for the payee's payment QR: versions 1-10, levels L/M/Q/H.
#
#   c = encode(data, ecc='M', version=None, mask=None)   data: bytes or str (str is sent as UTF-8)
#   c.version, c.size (modules per side), c.mask, c.ecc; c.get(x, y) -> True for dark (x column, y row)
#   ValueError for a bad ecc/version/mask, or data that does not fit the version asked for (or version 10).
#   dump(...) packs a whole symbol for tests; penalty(m, size) is the mask score.
#
# One segment in one mode: numeric if every character is a digit, else alphanumeric if every character
# is in the QR alphanumeric alphabet (base45 text always is), else bytes. A mixed-mode split saves a few
# bits only on mixed data; the payee's payload is pure alphanumeric, so it isn't worth the code.
# No ECI header: byte-mode readers then guess the text encoding (UTF-8 in practice).
#
# RAM: the symbol is one bytearray of size*size (1 = dark), plus a same-sized function-pattern map and
# the codewords while encoding; no per-module objects. The GF(256) and alphabet tables are bytes
# constants, so a frozen build keeps them in flash. Pure logic: no display or hardware imports.
try:
    from micropython import const
except ImportError:  # CPython host tools
    def const(x):
        return x

# GF(256) mod x^8+x^4+x^3+x^2+1 (0x11D): _EXP[i] = 2^i, _LOG[2^i] = i (_LOG[0] unused)
_EXP = (
    b'\x01\x02\x04\x08\x10\x20\x40\x80\x1d\x3a\x74\xe8\xcd\x87\x13\x26\x4c\x98\x2d\x5a\xb4\x75\xea\xc9\x8f\x03\x06\x0c'
    b'\x18\x30\x60\xc0\x9d\x27\x4e\x9c\x25\x4a\x94\x35\x6a\xd4\xb5\x77\xee\xc1\x9f\x23\x46\x8c\x05\x0a\x14\x28\x50\xa0'
    b'\x5d\xba\x69\xd2\xb9\x6f\xde\xa1\x5f\xbe\x61\xc2\x99\x2f\x5e\xbc\x65\xca\x89\x0f\x1e\x3c\x78\xf0\xfd\xe7\xd3\xbb'
    b'\x6b\xd6\xb1\x7f\xfe\xe1\xdf\xa3\x5b\xb6\x71\xe2\xd9\xaf\x43\x86\x11\x22\x44\x88\x0d\x1a\x34\x68\xd0\xbd\x67\xce'
    b'\x81\x1f\x3e\x7c\xf8\xed\xc7\x93\x3b\x76\xec\xc5\x97\x33\x66\xcc\x85\x17\x2e\x5c\xb8\x6d\xda\xa9\x4f\x9e\x21\x42'
    b'\x84\x15\x2a\x54\xa8\x4d\x9a\x29\x52\xa4\x55\xaa\x49\x92\x39\x72\xe4\xd5\xb7\x73\xe6\xd1\xbf\x63\xc6\x91\x3f\x7e'
    b'\xfc\xe5\xd7\xb3\x7b\xf6\xf1\xff\xe3\xdb\xab\x4b\x96\x31\x62\xc4\x95\x37\x6e\xdc\xa5\x57\xae\x41\x82\x19\x32\x64'
    b'\xc8\x8d\x07\x0e\x1c\x38\x70\xe0\xdd\xa7\x53\xa6\x51\xa2\x59\xb2\x79\xf2\xf9\xef\xc3\x9b\x2b\x56\xac\x45\x8a\x09'
    b'\x12\x24\x48\x90\x3d\x7a\xf4\xf5\xf7\xf3\xfb\xeb\xcb\x8b\x0b\x16\x2c\x58\xb0\x7d\xfa\xe9\xcf\x83\x1b\x36\x6c\xd8'
    b'\xad\x47\x8e')
_LOG = (
    b'\x00\x00\x01\x19\x02\x32\x1a\xc6\x03\xdf\x33\xee\x1b\x68\xc7\x4b\x04\x64\xe0\x0e\x34\x8d\xef\x81\x1c\xc1\x69\xf8'
    b'\xc8\x08\x4c\x71\x05\x8a\x65\x2f\xe1\x24\x0f\x21\x35\x93\x8e\xda\xf0\x12\x82\x45\x1d\xb5\xc2\x7d\x6a\x27\xf9\xb9'
    b'\xc9\x9a\x09\x78\x4d\xe4\x72\xa6\x06\xbf\x8b\x62\x66\xdd\x30\xfd\xe2\x98\x25\xb3\x10\x91\x22\x88\x36\xd0\x94\xce'
    b'\x8f\x96\xdb\xbd\xf1\xd2\x13\x5c\x83\x38\x46\x40\x1e\x42\xb6\xa3\xc3\x48\x7e\x6e\x6b\x3a\x28\x54\xfa\x85\xba\x3d'
    b'\xca\x5e\x9b\x9f\x0a\x15\x79\x2b\x4e\xd4\xe5\xac\x73\xf3\xa7\x57\x07\x70\xc0\xf7\x8c\x80\x63\x0d\x67\x4a\xde\xed'
    b'\x31\xc5\xfe\x18\xe3\xa5\x99\x77\x26\xb8\xb4\x7c\x11\x44\x92\xd9\x23\x20\x89\x2e\x37\x3f\xd1\x5b\x95\xbc\xcf\xcd'
    b'\x90\x87\x97\xb2\xdc\xfc\xbe\x61\xf2\x56\xd3\xab\x14\x2a\x5d\x9e\x84\x3c\x39\x53\x47\x6d\x41\xa2\x1f\x2d\x43\xd8'
    b'\xb7\x7b\xa4\x76\xc4\x17\x49\xec\x7f\x0c\x6f\xf6\x6c\xa1\x3b\x52\x29\x9d\x55\xaa\xfb\x60\x86\xb1\xbb\xcc\x3e\x5a'
    b'\xcb\x59\x5f\xb0\x9c\xa9\xa0\x51\x0b\xf5\x16\xeb\x7a\x75\x2c\xd7\x4f\xae\xd5\xe9\xe6\xe7\xad\xe8\x74\xd6\xf4\xea'
    b'\xa8\x50\x58\xaf')
# alphanumeric value of ASCII codes 32..90, 0xff = not in the alphabet
_ALNUM = (
    b'\x24\xff\xff\xff\x25\x26\xff\xff\xff\xff\x27\x28\xff\x29\x2a\x2b\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x2c\xff'
    b'\xff\xff\xff\xff\xff\x0a\x0b\x0c\x0d\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f\x20'
    b'\x21\x22\x23')

# Per level (L, M, Q, H), per version 1..10: EC codewords per block, and number of blocks (ISO/IEC 18004
# Table 9). Blocks of one symbol share the EC length; when the data codewords don't divide evenly, the
# last blocks take one more data codeword.
_EC_PER_BLOCK = (
    b'\x07\x0a\x0f\x14\x1a\x12\x14\x18\x1e\x12'
    b'\x0a\x10\x1a\x12\x18\x10\x12\x16\x16\x1a'
    b'\x0d\x16\x12\x1a\x12\x18\x12\x16\x14\x18'
    b'\x11\x1c\x16\x10\x16\x1c\x1a\x1a\x18\x1c')
_BLOCKS = (
    b'\x01\x01\x01\x01\x01\x02\x02\x02\x02\x04'
    b'\x01\x01\x01\x02\x02\x04\x04\x04\x05\x05'
    b'\x01\x01\x02\x02\x04\x04\x06\x06\x08\x08'
    b'\x01\x01\x02\x04\x04\x04\x05\x06\x08\x08')

LEVELS = 'LMQH'
MAX_VERSION = const(10)
_NUMERIC = const(1)
_ALPHANUMERIC = const(2)
_BYTE = const(4)


class QrCode:
    def __init__(self, version, ecc, mask, modules):
        self.version = version
        self.size = version * 4 + 17
        self.ecc = ecc
        self.mask = mask
        self.modules = modules  # bytearray, row-major, 1 = dark

    def get(self, x, y):
        # Outside the symbol is the light quiet zone.
        s = self.size
        return 0 <= x < s and 0 <= y < s and self.modules[y * s + x] == 1


def encode(data, ecc='M', version=None, mask=None):
    if isinstance(data, str):
        data = data.encode()
    if ecc not in ('L', 'M', 'Q', 'H'):
        raise ValueError('qr: ecc must be L, M, Q or H')
    lvl = LEVELS.index(ecc)
    if mask is not None and mask not in (0, 1, 2, 3, 4, 5, 6, 7):
        raise ValueError('qr: mask must be 0..7')
    if version is not None and version not in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10):
        raise ValueError('qr: version must be 1..10')
    mode = _mode(data)
    n = len(data)
    for v in ((version,) if version else range(1, MAX_VERSION + 1)):
        nbits = _bits_needed(mode, n, v)
        ndata = data_codewords(v, lvl)
        if nbits <= ndata * 8:
            break
    else:
        raise ValueError('qr: %d %s characters do not fit version %d-%s' % (
            n, ('', 'numeric', 'alphanumeric', '', 'byte')[mode], version or MAX_VERSION, ecc))
    codewords = _codewords(_data_bits(data, mode, v, ndata), v, lvl)
    s = v * 4 + 17
    m = bytearray(s * s)
    fn = bytearray(s * s)  # 1 = function pattern: not data, never masked
    _function_patterns(m, fn, v, s)
    _place(m, fn, s, codewords)
    del codewords
    if mask is None:
        best = -1
        for k in range(8):
            _apply_mask(m, fn, s, k)
            _format_bits(m, s, lvl, k)
            p = penalty(m, s)
            if best < 0 or p < best:  # ties keep the lower mask number
                best = p
                mask = k
            _apply_mask(m, fn, s, k)  # XOR again undoes it
    _apply_mask(m, fn, s, mask)
    _format_bits(m, s, lvl, mask)
    return QrCode(v, ecc, mask, m)


def dump(data, ecc='M', version=None, mask=None):
    # The whole symbol in one call, for tests and host tools: (version, mask, bits), the modules row by row
    # as one bit string, 8 to a byte, first module in the top bit, 1 = dark.
    c = encode(data, ecc, version, mask)
    m = c.modules
    out = bytearray((len(m) + 7) >> 3)
    for i in range(len(m)):
        if m[i]:
            out[i >> 3] |= 0x80 >> (i & 7)
    return c.version, c.mask, bytes(out)


# ---- data bits and codewords ----

def raw_codewords(v):
    # Codewords in a version-v symbol: all modules minus function patterns, format and version info,
    # divided by 8 (the 0-7 remainder bits stay light before masking).
    bits = (16 * v + 128) * v + 64
    if v >= 2:
        na = v // 7 + 2  # alignment patterns per side
        bits -= (25 * na - 10) * na - 55
        if v >= 7:
            bits -= 36
    return bits >> 3


def data_codewords(v, lvl):
    i = lvl * 10 + v - 1
    return raw_codewords(v) - _EC_PER_BLOCK[i] * _BLOCKS[i]


def _mode(data):
    mode = _NUMERIC
    for c in data:
        if not 48 <= c <= 57:
            if c < 32 or c > 90 or _ALNUM[c - 32] == 255:
                return _BYTE
            mode = _ALPHANUMERIC
    return mode


def _count_bits(mode, v):
    # Width of the character count field: versions 1-9, then 10-26.
    if mode == _NUMERIC:
        return 10 if v < 10 else 12
    if mode == _ALPHANUMERIC:
        return 9 if v < 10 else 11
    return 8 if v < 10 else 16


def _bits_needed(mode, n, v):
    # The count always fits its field here: no version 1-9 symbol holds 256 bytes, 512 alphanumeric
    # or 1024 digits.
    b = 4 + _count_bits(mode, v)
    if mode == _NUMERIC:
        return b + n // 3 * 10 + (0, 4, 7)[n % 3]
    if mode == _ALPHANUMERIC:
        return b + n // 2 * 11 + n % 2 * 6
    return b + n * 8


def _put(buf, pos, val, n):
    # Append the n low bits of val, most significant first, at bit position pos.
    for i in range(n - 1, -1, -1):
        if (val >> i) & 1:
            buf[pos >> 3] |= 0x80 >> (pos & 7)
        pos += 1
    return pos


def _data_bits(data, mode, v, ndata):
    buf = bytearray(ndata)
    n = len(data)
    pos = _put(buf, 0, mode, 4)
    pos = _put(buf, pos, n, _count_bits(mode, v))
    i = 0
    if mode == _NUMERIC:
        while i < n:  # 3 digits in 10 bits, a last 2 in 7, a last 1 in 4
            k = min(3, n - i)
            val = 0
            for j in range(i, i + k):
                val = val * 10 + data[j] - 48
            pos = _put(buf, pos, val, 3 * k + 1)
            i += k
    elif mode == _ALPHANUMERIC:
        while i + 1 < n:  # 2 characters in 11 bits, a last 1 in 6
            pos = _put(buf, pos, _ALNUM[data[i] - 32] * 45 + _ALNUM[data[i + 1] - 32], 11)
            i += 2
        if i < n:
            pos = _put(buf, pos, _ALNUM[data[i] - 32], 6)
    else:
        for c in data:
            pos = _put(buf, pos, c, 8)
    # Terminator: up to 4 zero bits, then zeros to a byte boundary (buf is zeroed), then the pad bytes.
    i = (min(pos + 4, ndata * 8) + 7) >> 3
    pad = 0xEC
    while i < ndata:
        buf[i] = pad
        pad ^= 0xEC ^ 0x11
        i += 1
    return buf


def _generator(ne):
    # Reed-Solomon generator polynomial prod(x - 2^i), i < ne, without its leading 1, highest power
    # first, as logs: the QR generators up to degree 30 have no zero coefficient.
    g = bytearray(ne)
    g[ne - 1] = 1
    for i in range(ne):  # multiply by (x - 2^i); minus is plus in GF(2^8)
        for j in range(ne):
            c = g[j]
            g[j] = _EXP[(_LOG[c] + i) % 255] if c else 0
            if j + 1 < ne:
                g[j] ^= g[j + 1]
    for j in range(ne):
        g[j] = _LOG[g[j]]
    return g


def _codewords(dat, v, lvl):
    # Split the data codewords into blocks, append each block's EC codewords (remainder of
    # data * x^ne divided by the generator), then interleave: data column by column, then EC likewise.
    i = lvl * 10 + v - 1
    ne = _EC_PER_BLOCK[i]
    nb = _BLOCKS[i]
    raw = raw_codewords(v)
    nshort = nb - raw % nb  # blocks with one data codeword fewer, first
    sd = raw // nb - ne  # data codewords of a short block
    gen = _generator(ne)
    ec = bytearray(nb * ne)
    work = bytearray(sd + 1 + ne)
    exp = _EXP  # locals: faster than globals in MicroPython
    log = _LOG
    off = 0
    for b in range(nb):
        k = sd + (1 if b >= nshort else 0)
        for j in range(k):
            work[j] = dat[off + j]
        for j in range(k, k + ne):
            work[j] = 0
        for j in range(k):
            f = work[j]
            if f:
                lf = log[f]
                for t in range(ne):
                    work[j + 1 + t] ^= exp[(lf + gen[t]) % 255]
        for t in range(ne):
            ec[b * ne + t] = work[k + t]
        off += k
    out = bytearray(raw)
    o = 0
    for j in range(sd + 1):
        for b in range(nb):
            if j < sd or b >= nshort:
                out[o] = dat[b * sd + (b - nshort if b > nshort else 0) + j]
                o += 1
    for t in range(ne):
        for b in range(nb):
            out[o] = ec[b * ne + t]
            o += 1
    return out


# ---- the matrix ----

def _set(m, fn, s, x, y, dark):
    i = y * s + x
    m[i] = 1 if dark else 0
    fn[i] = 1


def _function_patterns(m, fn, v, s):
    for i in range(s):  # timing patterns; the finders overwrite their ends
        _set(m, fn, s, 6, i, i % 2 == 0)
        _set(m, fn, s, i, 6, i % 2 == 0)
    for cx, cy in ((3, 3), (s - 4, 3), (3, s - 4)):  # finders with their light separators
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                x = cx + dx
                y = cy + dy
                if 0 <= x < s and 0 <= y < s:
                    d = max(abs(dx), abs(dy))
                    _set(m, fn, s, x, y, d != 2 and d != 4)
    if v >= 2:
        # Alignment centres: 6, then evenly spaced (even steps) down to s - 7; none on the finders.
        na = v // 7 + 2
        step = (v * 8 + na * 3 + 5) // (na * 4 - 4) * 2
        pos = [6] + [s - 7 - (na - 2 - i) * step for i in range(na - 1)]
        for i in range(na):
            for j in range(na):
                if (i == 0 and (j == 0 or j == na - 1)) or (i == na - 1 and j == 0):
                    continue
                for dy in range(-2, 3):
                    for dx in range(-2, 3):
                        _set(m, fn, s, pos[i] + dx, pos[j] + dy, max(abs(dx), abs(dy)) != 1)
    _format_bits(m, s, 0, 0)  # reserves the format areas; rewritten for each mask
    for i in range(8):
        fn[8 * s + i] = fn[8 * s + s - 1 - i] = fn[i * s + 8] = fn[(s - 1 - i) * s + 8] = 1
    fn[8 * s + 8] = 1
    if v >= 7:
        # Version information: 6 bits + BCH(18,6) remainder (generator 0x1F25), in two 6x3 blocks.
        r = v
        for _ in range(12):
            r = (r << 1) ^ ((r >> 11) * 0x1F25)
        bits = v << 12 | r
        for i in range(18):
            a = s - 11 + i % 3
            b = i // 3
            dark = (bits >> i) & 1
            _set(m, fn, s, a, b, dark)
            _set(m, fn, s, b, a, dark)


def _format_bits(m, s, lvl, mask):
    # Level (L=01, M=00, Q=11, H=10) and mask, BCH(15,5) remainder (generator 0x537), XOR 0x5412,
    # written twice: around the top-left finder, and split between the other two.
    data = (lvl ^ 1) << 3 | mask
    r = data
    for _ in range(10):
        r = (r << 1) ^ ((r >> 9) * 0x537)
    bits = (data << 10 | r) ^ 0x5412
    for i in range(15):
        b = (bits >> i) & 1
        # first copy: down column 8 (skipping the timing row), then left along row 8
        if i < 6:
            m[i * s + 8] = b
        elif i < 8:
            m[(i + 1) * s + 8] = b
        elif i == 8:
            m[8 * s + 7] = b
        else:
            m[8 * s + 14 - i] = b
        # second copy: row 8 from the right edge, then column 8 up to the bottom edge
        if i < 8:
            m[8 * s + s - 1 - i] = b
        else:
            m[(s - 15 + i) * s + 8] = b
    m[(s - 8) * s + 8] = 1  # the dark module


def _place(m, fn, s, cw):
    # Zigzag in two-module columns from the bottom-right corner, up then down, skipping the vertical
    # timing column; bits go most significant first. Modules past the codewords stay light.
    nbits = len(cw) * 8
    i = 0
    right = s - 1
    while right >= 1:
        if right == 6:
            right = 5
        up = (right + 1) & 2 == 0
        for vert in range(s):
            row = (s - 1 - vert if up else vert) * s
            for x in range(right, right - 2, -1):
                j = row + x
                if not fn[j]:
                    if i < nbits:
                        m[j] = (cw[i >> 3] >> (7 - (i & 7))) & 1
                    i += 1
        right -= 2


def _mask_bit(k, x, y):
    # Mask k darkens-or-lightens module (x, y) (x column, y row) when this is true.
    if k == 0:
        return (x + y) % 2 == 0
    if k == 1:
        return y % 2 == 0
    if k == 2:
        return x % 3 == 0
    if k == 3:
        return (x + y) % 3 == 0
    if k == 4:
        return (y // 2 + x // 3) % 2 == 0
    p = x * y
    if k == 5:
        return p % 2 + p % 3 == 0
    if k == 6:
        return (p % 2 + p % 3) % 2 == 0
    return ((x + y) % 2 + p % 3) % 2 == 0


def _apply_mask(m, fn, s, k):
    # Every mask repeats every 6 columns, so work out one row's 6 phases and stride through the row.
    for y in range(s):
        row = y * s
        for x0 in range(6):
            if _mask_bit(k, x0, y):
                for i in range(row + x0, row + s, 6):
                    if not fn[i]:
                        m[i] ^= 1


# ---- mask evaluation (ISO/IEC 18004:2015 7.8.3) ----

def penalty(m, s):
    # Sum of the four rules on an s*s matrix (1 = dark), format information included:
    #   N1: each run of 5 + i same-colour modules in a row or column: 3 + i
    #   N2: each 2x2 block of one colour (overlapping blocks count separately): 3
    #   N3: each 1:1:3:1:1 dark-light-dark-light-dark pattern in a row or column with light 4 units
    #       wide before it, and again if after it: 40. The runs must be exactly those lengths (a unit of
    #       n modules, light 4n), and the quiet zone outside the symbol counts as light.
    #   N4: 10 for each full 5% the dark share is away from 50% (45-55% costs nothing).
    p = 0
    for y in range(s):
        p += _line(m, y * s, 1, s)
    for x in range(s):
        p += _line(m, x, s, s)
    for y in range(s - 1):
        i = y * s
        a = m[i]
        c = m[i + s]
        for j in range(i + 1, i + s):
            b = m[j]
            if b == a and a == c and c == m[j + s]:
                p += 3
            a = b
            c = m[j + s]
    t = s * s
    k = (abs(sum(m) * 20 - t * 10) + t - 1) // t - 1  # smallest k: dark share within 50% +- 5(k+1)%
    return p + k * 10 if k > 0 else p


def _line(m, i, step, n):
    # Rules N1 and N3 along one row (step 1) or column (step s) of n modules from index i.
    # h0..h6: lengths of the last seven finished runs, newest first (so they alternate in colour).
    p = 0
    end = i + step * n
    c = 0  # colour of the current run; the quiet zone before the line is light
    run = 0
    h0 = h1 = h2 = h3 = h4 = h5 = h6 = 0
    while i != end:
        v = m[i]
        i += step
        if v == c:
            run += 1
            continue
        if run >= 5:
            p += run - 2
        if not h0:
            run += n  # the line's first run is light and takes in the quiet zone
        h6 = h5
        h5 = h4
        h4 = h3
        h3 = h2
        h2 = h1
        h1 = h0
        h0 = run
        if not c and h3 == 3 * h1 and h1 == h2:  # a light run ended: check the five runs before it
            p += _finder(h0, h1, h2, h3, h4, h5, h6)
        c = v
        run = 1
    if run >= 5:
        p += run - 2
    if c:  # a dark run ends the line; the quiet zone is the light run after it
        h6 = h5
        h5 = h4
        h4 = h3
        h3 = h2
        h2 = h1
        h1 = h0
        h0 = run
        run = 0
    return p + _finder(run + n, h0, h1, h2, h3, h4, h5)


def _finder(after, d1, l2, d3, l4, d5, before):
    # Runs from the end: light, dark, light, dark, light, dark, light. 40 for each light side that is
    # 4 units wide when the five middle runs are 1:1:3:1:1 units.
    u = d1
    if u and l2 == u and l4 == u and d5 == u and d3 == 3 * u:
        return (40 if after >= 4 * u and before >= u else 0) + (40 if before >= 4 * u and after >= u else 0)
    return 0
