# virtsim — see README.md. Every target installs what it needs first (Debian 12, as root).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := qemu-system-x86 qemu-utils nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd \
                python3-libvirt python3-venv python3-pip gnutls-bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@if ! command -v qemu-system-x86_64 >/dev/null || ! command -v nbdinfo >/dev/null \
	    || ! /usr/bin/python3 -c 'import nbd, libvirt, venv, ensurepip' 2>/dev/null \
	    || ! command -v certtool >/dev/null || ! command -v nbdkit >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PACKAGES); \
	fi
	# the venv sees Debian's python3-libnbd (module `nbd`), as real pull-mode clients do
	/usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# compat editable mode: a plain path entry, no import hook (saves ~10 ms per start)
	$(VENV)/bin/pip install -q -e '.[test,dev]' --config-settings editable_mode=compat
	touch $(STAMP)

demo: setup
	$(VENV)/bin/virtsim demo

test: setup
	$(VENV)/bin/pytest -q

bench: setup
	$(PY) -m bench

lint: setup
	$(VENV)/bin/ruff check virtsim tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
