# Comparisons whose time does not depend on where secret bytes differ.


def equal(a, b):
    # Time depends on the length (public) only, never on the position of a difference.
    if len(a) != len(b):
        return False
    acc = 0
    for x, y in zip(a, b):
        acc |= x ^ y
    return acc == 0
