# Entering an amount with two or three buttons, as pure logic (the card shows ('payer_amount', digits, ...)).
#
#   e = AmountEntry()
#   e.key(name, event) -> None (still entering), "done" or "cancel"; e.digits, e.amount()
#
# The last digit is the one being set: DOWN adds 1 to it (9 wraps to 0), UP takes 1 off, CONFIRM moves on to
# a new digit (the amount so far times ten), holding CONFIRM finishes (only with an amount above zero),
# holding DOWN cancels. "" starts at $0.00; at most MAX_DIGITS digits.
MAX_DIGITS = 9  # under 2^32 minor units


class AmountEntry:
    def __init__(self):
        self.digits = ""

    def amount(self):
        return int(self.digits or "0")

    def key(self, name, event):
        d = self.digits
        if event == "long":
            if name == "confirm":
                return "done" if self.amount() else None
            if name == "down":
                return "cancel"
            return None
        if name == "down" or name == "up":
            last = int(d[-1]) if d else 0
            last = (last + (1 if name == "down" else 9)) % 10
            d = d[:-1] + str(last)
        elif name == "confirm" and self.amount() and len(d) < MAX_DIGITS:
            d += "0"
        self.digits = d
        return None
