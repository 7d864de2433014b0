# Wi-Fi for the ESP32 boards' network(): MicroPython's network.WLAN, imported only when a device goes online.


def connect(config, timeout_ms=15000):
    # Joins the access point of the device config's "wifi" ({"ssid", "password",
    # "backend": the backend's http://host:port}) and returns the backend's URL; OSError when there is no Wi-Fi
    # in the config or no connection within timeout_ms. The sync runs over it with `socket` (paytoken.sync_http).
    import time

    import network

    w = (config or {}).get("wifi")
    if not w:
        raise OSError(19, "no Wi-Fi in the device config")
    sta = network.WLAN(network.STA_IF)
    sta.active(True)
    if not sta.isconnected():
        sta.connect(w["ssid"], w.get("password", ""))
        t0 = time.ticks_ms()
        while not sta.isconnected():
            if time.ticks_diff(time.ticks_ms(), t0) > timeout_ms:
                raise OSError(110, "Wi-Fi: no connection to " + w["ssid"])
            time.sleep_ms(200)
    return w["backend"]
