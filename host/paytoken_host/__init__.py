"""Host side of paytoken: provisioning, sync bridge, settlement backend and developer tools."""

__version__ = "0.1.0"
