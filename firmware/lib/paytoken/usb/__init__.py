# USB serial: the framed request/response protocol (frames.py) and its dispatcher (service.py); the
# provisioning requests are paytoken.provisioning's. docs/protocol.md §11.
