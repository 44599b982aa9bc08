"""Pull backups with <server tls='yes'>: x509 credentials from the configured directory
(libvirt's backup_tls_x509_cert_dir), a TLS NBD client reads, a plaintext one is refused;
without credentials the error is QEMU's object-add error, as with libvirt."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

import virtsim.api as libvirt

DOMAIN = """<domain type='kvm'><name>tlsvm</name><memory unit='MiB'>64</memory>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>
<target dev='vda' bus='virtio'/></disk></devices></domain>"""


def _certtool(*args: str) -> None:
    subprocess.run(["certtool", *args], check=True, capture_output=True, timeout=20)


def _pki(base: Path) -> tuple[Path, Path]:
    server, client = base / "server", base / "client"
    server.mkdir()
    client.mkdir()
    key = ["--generate-privkey", "--key-type=ecdsa", "--outfile"]
    _certtool(*key, str(base / "ca-key.pem"))
    (base / "ca.info").write_text("cn = Test CA\nca\ncert_signing_key\n")
    ca = base / "ca-cert.pem"
    _certtool("--generate-self-signed", "--load-privkey", str(base / "ca-key.pem"),
              "--template", str(base / "ca.info"), "--outfile", str(ca))
    for d, role, info in ((server, "server", "cn = localhost\ndns_name = localhost\n"
                           "ip_address = 127.0.0.1\ntls_www_server\n"),
                          (client, "client", "cn = client\ntls_www_client\n")):
        _certtool(*key, str(d / f"{role}-key.pem"))
        (base / f"{role}.info").write_text(info + "encryption_key\nsigning_key\n")
        _certtool("--generate-certificate", "--load-ca-privkey", str(base / "ca-key.pem"),
                  "--load-ca-certificate", str(ca), "--load-privkey",
                  str(d / f"{role}-key.pem"), "--template", str(base / f"{role}.info"),
                  "--outfile", str(d / f"{role}-cert.pem"))
        (d / "ca-cert.pem").write_bytes(ca.read_bytes())
    return server, client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tls_pull_backup(tmp_path: Path) -> None:
    if shutil.which("certtool") is None or shutil.which("nbdinfo") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("certtool (gnutls-bin) and nbdinfo (libnbd-bin) are missing in CI")
        pytest.skip("certtool (gnutls-bin) and nbdinfo (libnbd-bin) are needed")
    server, client = _pki(tmp_path)
    disk = tmp_path / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    port = _free_port()
    xml = (f"<domainbackup mode='pull'><server tls='yes' name='127.0.0.1' port='{port}'/>"
           f"<disks><disk name='vda' type='file'><scratch file='{tmp_path / 's.qcow2'}'/>"
           f"</disk></disks></domainbackup>")
    uri = f"virtsim:///embedded?tls_x509_cert_dir={server}"
    with libvirt.open(uri) as conn:
        dom = conn.createXML(DOMAIN.format(disk=disk))
        dom.backupBegin(xml, None)
        assert "tls='yes'" in dom.backupGetXMLDesc()
        nbd_uri = f"nbds://127.0.0.1:{port}/vda?tls-certificates={client}"
        ok = subprocess.run(["nbdinfo", "--size", nbd_uri],
                            capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == str(16 << 20)
        plain = subprocess.run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}/vda"],
                               capture_output=True, text=True, timeout=30)
        assert plain.returncode != 0
        dom.abortJob()
        dom.destroy()
    # no credentials configured: libvirt's default directory has none here
    with libvirt.open("virtsim:///embedded?tls_x509_cert_dir=/nonexistent-pki") as conn:
        dom = conn.createXML(DOMAIN.format(disk=disk))
        with pytest.raises(libvirt.libvirtError) as ei:
            dom.backupBegin(xml, None)
        assert ei.value.get_error_code() == libvirt.VIR_ERR_INTERNAL_ERROR
        assert str(ei.value) == ("internal error: unable to execute QEMU command 'object-add': "
                                 "Unable to access credentials /nonexistent-pki/ca-cert.pem: "
                                 "No such file or directory")
        assert not (tmp_path / "s.qcow2").exists()
        dom.destroy()
