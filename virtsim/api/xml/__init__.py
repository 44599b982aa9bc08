"""libvirt's XML documents for the API: parsed into dataclasses, printed the way libvirt 9.0 does.

- safe: hostile-input-proof parsing with libvirt's error texts, RNG validation.
- writer: libvirt's output style (2-space indent, single-quoted attributes).
- domain / checkpoint / backup: the three document types and their libvirt defaults.
"""
