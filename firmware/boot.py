# Runs first on every boot. Nothing here may fail: main.py does the real work.
# The firmware runs in place from the ROMFS partition when the board has one (`make deploy`: the code
# stays in flash instead of the heap), else from /lib (`make deploy-files`). /rom/lib goes first so a
# stale copy in /lib cannot shadow the image; /lib keeps the board's mip packages.
import sys

for _p in ("/rom", "/rom/lib"):
    if _p in sys.path:
        sys.path.remove(_p)
        sys.path.insert(1, _p)
if "/lib" not in sys.path:
    sys.path.append("/lib")
