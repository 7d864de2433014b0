# paytoken's BLE transport (docs/protocol.md section 9): gatt (service, advertising, control frames; no
# `bluetooth` import), irq (the one IRQ dispatcher), conn (a connection as a paytoken Link), peripheral (the
# payee: Peripheral) and central (the payer: connect).
