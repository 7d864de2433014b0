# Runs first on every boot. Nothing here may fail: main.py does the real work.
import sys

if "/lib" not in sys.path:
    sys.path.append("/lib")
