"""``object-add`` / ``object-del``: user-creatable QOM objects.

What the NBD server needs is real (``tls-creds-x509`` loads its PEM files into an SSL
context the way QEMU's credentials load them, ``authz-simple`` checks a client
certificate's distinguished name, ``secret`` holds a password); any other object type
the schema accepts is kept as a plain record so scripts that create one keep working.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...sim.block import id_wellformed
from ...sim.errors import SimError
from . import command

if TYPE_CHECKING:
    from ..emulator import Emulator

TLS_TYPES = ("tls-creds-x509", "tls-creds-psk", "tls-creds-anon")


@dataclass
class QomObject:
    qom_type: str
    id: str
    props: dict[str, Any]
    #: for server TLS credentials: the loaded context
    ssl_context: ssl.SSLContext | None = None
    #: for ``secret``: its value
    secret: bytes | None = None

    @property
    def endpoint(self) -> str:
        return str(self.props.get("endpoint", "client"))


def _cred_path(obj: dict[str, Any], fname: str, required: bool) -> str | None:
    """qcrypto_tls_creds_get_path: ``dir``/fname, with QEMU's texts."""
    d = obj.get("dir")
    if d is None:
        if required:
            raise SimError("Missing 'dir' property value")
        return None
    path = os.path.join(d, fname)
    if not os.access(path, os.R_OK):
        err = 2 if not os.path.exists(path) else 13
        if err == 2 and not required:
            return None
        raise SimError(f"Unable to access credentials {path}: {os.strerror(err)}")
    return path


def _pem_blocks(path: str, label: str) -> list[bytes]:
    """The DER bodies of a PEM file's ``label`` blocks; none at all if one of them does
    not decode (GnuTLS refuses the whole file then)."""
    with open(path, "rb") as f:
        text = f.read()
    tag = label.encode()
    out = []
    for m in re.finditer(rb"-----BEGIN " + tag + rb"-----(.*?)-----END " + tag + rb"-----",
                         text, re.S):
        try:
            out.append(base64.b64decode(b"".join(m.group(1).split()), validate=True))
        except binascii.Error:
            return []
    return out


def _load_x509(props: dict[str, Any]) -> ssl.SSLContext | None:
    """qcrypto_tls_creds_x509_load: paths first (CA, CRL, own cert and key), then the
    sanity check (own certificate, then the CA list), then the key pair."""
    cacert = _cred_path(props, "ca-cert.pem", True)
    server = props.get("endpoint", "client") == "server"
    role = "server" if server else "client"
    cacrl = _cred_path(props, "ca-crl.pem", False)
    cert = _cred_path(props, f"{role}-cert.pem", server)
    key = _cred_path(props, f"{role}-key.pem", server)
    assert cacert is not None
    if cert is not None and not _pem_blocks(cert, "CERTIFICATE"):
        # GnuTLS gives this one text for a missing header and for bad base64 alike
        raise SimError(f"Unable to import {role} certificate {cert}: "
                       "Base64 unexpected header error.")
    if not _pem_blocks(cacert, "CERTIFICATE"):
        raise SimError(f"Unable to import CA certificate list {cacert}")
    if not server:
        return None
    assert cert is not None and key is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_verify_locations(cacert)
        if cacrl:
            ctx.load_verify_locations(cacrl)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except (ssl.SSLError, OSError):
        raise SimError(f"Unable to import CA certificate list {cacert}") from None
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        why = "The certificate and the given key do not match." \
            if "KEY_VALUES_MISMATCH" in str(e) else "The requested data were not available."
        raise SimError(f"Cannot load certificate '{cert}' & key '{key}': {why}") from None
    # verify-peer (default on): clients must present a certificate the CA signed
    ctx.verify_mode = ssl.CERT_REQUIRED if props.get("verify-peer", True) else ssl.CERT_NONE
    return ctx


def _load_psk(props: dict[str, Any]) -> None:
    """qcrypto_tls_creds_psk_load: both ends need keys.psk; a client also needs its
    ``username`` (default "qemu") in it."""
    path = _cred_path(props, "keys.psk", True)
    assert path is not None
    if props.get("endpoint", "client") == "server":
        return
    user = props.get("username", "qemu")
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.split(":", 1)[0] == user and ":" in line:
                return
    raise SimError(f"Username {user} not found in PSK file {path}")


def _unusable_context() -> ssl.SSLContext:
    """PSK and anonymous credentials: Python 3.11's ssl offers neither, so the server
    starts as QEMU's does but every TLS handshake with it fails."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers("aNULL:@SECLEVEL=0")
    return ctx


#: in the schema, but not built into the Debian 7.2 x86_64 binary
_ABSENT_TYPES = ("authz-listfile", "s390-pv-guest")
_B64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


@command("object-add")
def object_add(emu: Emulator, a: dict[str, Any]) -> Any:
    """QEMU's order: id syntax, type, duplicate id, then the type's own completion
    (files, keys)."""
    qom_type, oid = a["qom-type"], a["id"]
    props = {k: v for k, v in a.items() if k not in ("qom-type", "id")}
    if not id_wellformed(oid):
        raise SimError("Parameter 'id' expects an identifier")
    if qom_type in _ABSENT_TYPES:
        raise SimError(f"invalid object type: {qom_type}")
    if oid in emu.objects:
        raise SimError(f"attempt to add duplicate property '{oid}' to object "
                       "(type 'container')")
    obj = QomObject(qom_type, oid, props)
    if qom_type == "tls-creds-x509":
        obj.ssl_context = _load_x509(props)
    elif qom_type == "tls-creds-psk":
        _load_psk(props)
        if props.get("endpoint", "client") == "server":
            obj.ssl_context = _unusable_context()
    elif qom_type == "tls-creds-anon":
        if props.get("endpoint", "client") == "server":
            obj.ssl_context = _unusable_context()
    elif qom_type == "secret":
        obj.secret = _load_secret(emu, props)
    emu.objects[oid] = obj
    return {}


def _b64decode(text: str) -> bytes:
    """qbase64_decode: only the alphabet is checked; GLib then decodes leniently
    (an incomplete last group of characters is dropped)."""
    raw = text.encode()
    if not set(raw) <= _B64_CHARS:
        raise SimError("Base64 data contains invalid characters")
    whole = raw[:len(raw) // 4 * 4]
    if not whole:
        return b""
    pad = min(2, 4 - len(whole[-4:].rstrip(b"=")))
    return base64.b64decode(whole.replace(b"=", b"A"))[:len(whole) // 4 * 3 - pad]


def _load_secret(emu: Emulator, props: dict[str, Any]) -> bytes:
    """qcrypto_secret_load: the raw data or file, then decryption with ``keyid`` (checked
    as far as QEMU checks before the AES step), else base64 decoding."""
    if "data" not in props and "file" not in props:
        raise SimError("Either 'file' or 'data' must be provided")
    if "data" in props and "file" in props:
        raise SimError("'file' and 'data' are mutually exclusive")
    if "file" in props:
        path = props["file"]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except IsADirectoryError:
            raise SimError(f"Unable to read {path}: Error reading file \u201c{path}\u201d: "
                           "Is a directory") from None
        except OSError as e:
            raise SimError(f"Unable to read {path}: Failed to open file \u201c{path}\u201d: "
                           f"{os.strerror(e.errno or 0)}") from None
    else:
        data = props["data"].encode()
    b64 = props.get("format", "raw") == "base64"
    keyid = props.get("keyid")
    if keyid is None:
        return _b64decode(data.decode(errors="replace")) if b64 else data
    key = emu.objects.get(keyid)
    if key is None:
        raise SimError(f"No secret with id '{keyid}'")
    if key.qom_type != "secret" or key.secret is None:
        raise SimError(f"Object with id '{keyid}' is not a secret")
    if len(key.secret) != 32:
        raise SimError("Key should be 32 bytes in length")
    if "iv" not in props:
        raise SimError("IV is required to decrypt secret")
    iv = _b64decode(props["iv"])
    if len(iv) != 16:
        raise SimError(f"IV should be 16 bytes in length not {len(iv)}")
    cipher = _b64decode(data.decode(errors="replace")) if b64 else data
    if len(cipher) % 16:
        raise SimError(f"Length {len(cipher)} must be a multiple of block size 16")
    # AES-256-CBC is not in Python's standard library: the ciphertext stands in for
    # the plaintext (nothing in virtsim consumes secret values)
    return cipher


@command("object-del")
def object_del(emu: Emulator, a: dict[str, Any]) -> Any:
    oid = a["id"]
    obj = emu.objects.get(oid)
    if obj is None:
        raise SimError(f"object '{oid}' not found")
    # TLS credentials, secrets and authz objects have no can_be_deleted hook in QEMU:
    # deleting one in use only drops its name (a running NBD server keeps its creds)
    del emu.objects[oid]
    return {}


def peer_dn(cert: dict[str, Any]) -> str:
    """A client certificate's subject as QEMU's authz sees it (GnuTLS's DN string, RDNs
    in the certificate's own order, e.g. ``C=GB,O=virtsim,CN=client``)."""
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
             "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
             "emailAddress": "EMAIL", "domainComponent": "DC"}
    parts = []
    for rdn in cert.get("subject", ()):
        parts.append("+".join(f"{short.get(k, k)}={v}" for k, v in rdn))
    return ",".join(parts)
