"""Hostile XML ends in libvirt's clean XML errors, fast, without expansion, files or network."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from virtsim.api import constants as c
from virtsim.api.errors import libvirtError
from virtsim.api.xml.backup import parse_backup
from virtsim.api.xml.checkpoint import parse_checkpoint
from virtsim.api.xml.domain import format_domain, parse_domain


def _entity(level: int) -> str:
    below = "lol" if level == 2 else f"lol{level - 1}"
    return f' <!ENTITY lol{level} "' + f"&{below};" * 10 + '">'


LAUGHS = "\n".join(
    ['<?xml version="1.0"?>', "<!DOCTYPE lolz [", ' <!ENTITY lol "lol">']
    + [_entity(level) for level in range(2, 10)]
    + ["]>"]
)

PARSERS: dict[str, tuple[Callable[[str], object], str, int]] = {
    "domain": (parse_domain, "domain", c.VIR_FROM_DOMAIN),
    "checkpoint": (parse_checkpoint, "domaincheckpoint", c.VIR_FROM_DOMAIN_CHECKPOINT),
    "backup": (parse_backup, "domainbackup", c.VIR_FROM_DOMAIN),
}


def _laughs(root: str) -> str:
    inner = "<name>&lol9;</name>" if root != "domainbackup" else "<incremental>&lol9;</incremental>"
    return f"{LAUGHS}\n<{root}>{inner}</{root}>"


def _raises(call: Callable[[], object], limit: float = 1.0) -> libvirtError:
    start = time.monotonic()
    with pytest.raises(libvirtError) as info:
        call()
    assert time.monotonic() - start < limit, "hostile input must fail fast"
    return info.value


def test_laughs_document_is_what_we_think() -> None:
    assert ' <!ENTITY lol2 "' + "&lol;" * 10 + '">' in LAUGHS
    assert ' <!ENTITY lol9 "' + "&lol8;" * 10 + '">' in LAUGHS


@pytest.mark.parametrize("kind", sorted(PARSERS))
def test_billion_laughs(kind: str) -> None:
    parse, root, domain = PARSERS[kind]
    err = _raises(lambda: parse(_laughs(root)))
    assert err.get_error_code() == c.VIR_ERR_XML_DETAIL
    assert err.get_error_domain() == domain
    # libvirt 9.0 on Debian 12 (libxml2 2.9.14) says exactly this first line.
    assert str(err).startswith("at line 1: Detected an entity reference loop\n")


@pytest.mark.parametrize("kind", sorted(PARSERS))
def test_quadratic_blowup(kind: str) -> None:
    parse, root, domain = PARSERS[kind]
    big = "A" * 50_000
    text = "<name>" + "&a;" * 50_000 + "</name>"
    xml = f'<?xml version="1.0"?>\n<!DOCTYPE d [ <!ENTITY a "{big}"> ]>\n<{root}>{text}</{root}>'
    err = _raises(lambda: parse(xml))
    assert err.get_error_code() == c.VIR_ERR_XML_DETAIL
    assert err.get_error_domain() == domain


def test_external_entity_is_never_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    xml = (
        f'<?xml version="1.0"?>\n<!DOCTYPE d [ <!ENTITY x SYSTEM "file://{secret}"> ]>\n'
        "<domain><name>n&x;</name><memory>1024</memory><os><type>hvm</type></os></domain>"
    )
    defn = parse_domain(xml)
    assert defn.name == "n"
    assert "TOPSECRET" not in format_domain(defn)


@pytest.fixture
def listener() -> Iterator[tuple[int, list[bytes]]]:
    """A loopback TCP listener recording any connection attempt (there must be none)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.2)
    seen: list[bytes] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            seen.append(conn.recv(100))
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield srv.getsockname()[1], seen
    stop.set()
    thread.join()
    srv.close()


@pytest.mark.parametrize(
    "doctype",
    [
        '<!DOCTYPE domain SYSTEM "http://127.0.0.1:{port}/x.dtd">',
        '<!DOCTYPE domain [ <!ENTITY % p SYSTEM "http://127.0.0.1:{port}/p"> %p; ]>',
        '<!DOCTYPE domain [ <!ENTITY e SYSTEM "http://127.0.0.1:{port}/e"> ]>',
    ],
)
def test_no_network_fetches(listener: tuple[int, list[bytes]], doctype: str) -> None:
    port, seen = listener
    ref = "&e;" if "ENTITY e" in doctype else ""
    xml = doctype.format(port=port) + (
        f"<domain><name>n{ref}</name><memory>1</memory><os><type>hvm</type></os></domain>"
    )
    assert parse_domain(xml).name == "n"
    time.sleep(0.3)  # the listener thread would have seen a connection by now
    assert seen == []


@pytest.mark.parametrize(
    "data",
    [
        "<a>" * 5000 + "</a>" * 5000,  # deeper than libxml2's default limit (256)
        b"\xff\xfe<domain/>",
        b"<domain><name>\xc3(</name></domain>",
        "<domain><name>\x01</name></domain>",
        "not xml at all",
        "",
    ],
)
def test_garbage_is_a_clean_xml_detail(data: str | bytes) -> None:
    err = _raises(lambda: parse_domain(data))
    assert err.get_error_code() == c.VIR_ERR_XML_DETAIL
    assert err.get_error_domain() == c.VIR_FROM_DOMAIN
    assert str(err).startswith("(domain_definition):1: ")


def test_giant_text_node_is_refused() -> None:
    # libxml2's default cap on one text node is 10,000,000 bytes (lifted only by huge_tree).
    xml = "<domain><name>" + "x" * 10_000_001 + "</name></domain>"
    err = _raises(lambda: parse_domain(xml), limit=5.0)
    assert err.get_error_code() == c.VIR_ERR_XML_DETAIL
