# The payer and payee applications (docs/architecture.md, "Applications"): the protocol sessions driven by
# a link, the screens, the buttons and the scanner. start.py builds one from the board and the device store.
