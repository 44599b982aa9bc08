"""virtsim: a simulated QEMU 7.2 / libvirt backend for incremental-backup testing."""

__version__ = "0.1.0"
