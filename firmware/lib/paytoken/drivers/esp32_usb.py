# board.usb() of the ESP32 boards: what the firmware's USB service (paytoken.provisioning) needs of the board.
# Imported only when start-up asks (and dropped again when the device runs its app).
#   Usb(info).service_requested()   the first button held down at power-on: a provisioned device's USB service
#   Usb(info).port()                the USB serial (stdin/stdout as raw bytes: paytoken.usb.stdio.StdioPort)
#   Usb(info).rng_entropy()         the radio on while keys are drawn: the ESP32's RNG is truly random only with
#                                   an entropy source running (docs/security.md); returns what restores it
#   Usb(info).reset()               machine.reset(): after finalise the device boots into its app
class Usb:
    def __init__(self, info):
        self.info = info
        self.chip = info.get("chip", "esp32")

    def service_requested(self):
        from machine import Pin

        b = self.info["buttons"][0]
        return Pin(b["pin"], Pin.IN, pull=Pin.PULL_UP if b["pull_up"] else None).value() == 0

    def port(self):
        from paytoken.usb.stdio import StdioPort

        return StdioPort()

    def rng_entropy(self):
        import bluetooth

        ble = bluetooth.BLE()
        was = ble.active()
        ble.active(True)
        return lambda: was or ble.active(False)

    def reset(self):
        import machine

        machine.reset()
