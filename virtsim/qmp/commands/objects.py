"""``object-add`` / ``object-del``: user-creatable QOM objects.

What the NBD server needs is real (``tls-creds-x509`` loads its PEM files into an SSL
context the way QEMU's credentials load them, ``authz-simple`` checks a client
certificate's distinguished name, ``secret`` holds a password); any other object type
the schema accepts is kept as a plain record so scripts that create one keep working.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
    #: for tls-creds-x509 server credentials: the loaded context
    ssl_context: ssl.SSLContext | None = None
    users: set[str] = field(default_factory=set)

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


def _load_x509(props: dict[str, Any]) -> ssl.SSLContext | None:
    cacert = _cred_path(props, "ca-cert.pem", True)
    server = props.get("endpoint", "client") == "server"
    if not server:
        _cred_path(props, "client-cert.pem", False)
        _cred_path(props, "client-key.pem", False)
        return None
    cacrl = _cred_path(props, "ca-crl.pem", False)
    cert = _cred_path(props, "server-cert.pem", True)
    key = _cred_path(props, "server-key.pem", True)
    assert cacert and cert and key
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise SimError(f"Unable to load server certificate {cert}: {e}") from None
    try:
        ctx.load_verify_locations(cacert)
        if cacrl:
            ctx.load_verify_locations(cacrl)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except (ssl.SSLError, OSError) as e:
        raise SimError(f"Unable to load CA certificate {cacert}: {e}") from None
    # verify-peer (default on): clients must present a certificate the CA signed
    ctx.verify_mode = ssl.CERT_REQUIRED if props.get("verify-peer", True) else ssl.CERT_NONE
    return ctx


@command("object-add")
def object_add(emu: Emulator, a: dict[str, Any]) -> Any:
    qom_type, oid = a["qom-type"], a["id"]
    props = {k: v for k, v in a.items() if k not in ("qom-type", "id")}
    if oid in emu.objects:
        raise SimError(f"attempt to add duplicate property '{oid}' to object "
                       "(type 'container')")
    obj = QomObject(qom_type, oid, props)
    if qom_type == "tls-creds-x509":
        obj.ssl_context = _load_x509(props)
    elif qom_type == "tls-creds-psk":
        if props.get("endpoint", "client") == "server":
            _cred_path(props, "keys.psk", True)
    elif qom_type == "secret":
        if "data" not in props and "file" not in props:
            raise SimError("Either 'file' or 'data' must be provided")
        if "data" in props and "file" in props:
            raise SimError("'file' and 'data' are mutually exclusive")
        if "file" in props and not os.access(props["file"], os.R_OK):
            raise SimError(f"Unable to read {props['file']}: Failed to open file "
                           f"\u201c{props['file']}\u201d: No such file or directory")
    emu.objects[oid] = obj
    return {}


@command("object-del")
def object_del(emu: Emulator, a: dict[str, Any]) -> Any:
    oid = a["id"]
    obj = emu.objects.get(oid)
    if obj is None:
        raise SimError(f"object '{oid}' not found")
    if obj.users:
        raise SimError(f"object '{oid}' is in use, can not be deleted")
    del emu.objects[oid]
    return {}


def peer_dn(cert: dict[str, Any]) -> str:
    """A client certificate's subject as GnuTLS prints it (RFC 4514: last RDN first),
    which is what ``authz-simple``'s ``identity`` is compared with."""
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
             "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
             "emailAddress": "EMAIL", "domainComponent": "DC"}
    parts = []
    for rdn in reversed(cert.get("subject", ())):
        parts.append("+".join(f"{short.get(k, k)}={v}" for k, v in rdn))
    return ",".join(parts)
