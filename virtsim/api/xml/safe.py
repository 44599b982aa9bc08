"""Parsing untrusted XML the way libvirt does, minus libvirt's exposure to hostile documents.

libvirt (virxml.c) parses without entity substitution or DTD loading, reports the *first*
well-formedness error as VIR_ERR_XML_DETAIL "<url>:<line>: <libxml2 message>\\n<source line>\\n
<dashes>^" in the caller's error domain, then checks the root element name (VIR_ERR_XML_ERROR) and
validates against its RNG schema (VIR_ERR_XML_INVALID_SCHEMA listing libxml2's messages).

The parser here never resolves entities, never loads a DTD or anything over the network, and keeps
libxml2's size limits, so billion-laughs and external-entity documents end in a clean XML_DETAIL
error instead of work. Known divergence: the libxml2 inside lxml is newer than Debian 12's 2.9.14,
which names an expansion bomb "Detected an entity reference loop"; that text is restored here, but
the context line is the document's, not the entity's.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from lxml import etree

from virtsim.api import errors

SCHEMA_DIR = Path(os.environ.get("VIRTSIM_LIBVIRT_SCHEMAS", "/usr/share/libvirt/schemas"))

# libxml2 2.9.14's wording for what newer releases call an amplification/resource limit.
_ENTITY_LOOP = "Detected an entity reference loop"


def _parser() -> etree.XMLParser:
    # A fresh parser per document: lxml parsers accumulate their error log across uses.
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )


def _context(source: str, line: int, column: int) -> tuple[str, str]:
    """libvirt's two context lines: the offending source line and a dashed pointer under it."""
    lines = source.splitlines() or [""]
    text = lines[min(max(line, 1), len(lines)) - 1]
    col = max(column - 1, 0)
    pointer = "".join("\t" if ch == "\t" else "-" for ch in text[:col])
    return text, pointer + "^"


def _syntax_error(
    source: str,
    url: str,
    err_domain: int,
    exc: etree.XMLSyntaxError,
    log: etree._ListErrorLog,
) -> Exception:
    # The parser's own log: the exception's is lxml's per-thread log, holding earlier documents.
    entries = [e for e in log if e.level >= etree.ErrorLevels.ERROR]
    if entries:
        first = entries[0]
        message, line, column, type_name = first.message, first.line, first.column, first.type_name
    else:
        message, (line, column), type_name = str(exc.msg), exc.position, ""
    if not source:
        # libvirt prints its NULL context pointer through glib, which renders it as "(null)".
        return errors.xml_detail(err_domain, f"{url}:{line}: {message}\n(null)\n^")
    context, pointer = _context(source, line, column)
    if type_name == "ERR_RESOURCE_LIMIT" and "amplification" in message:
        # Raised while expanding an entity: libvirt's label is the entity's (unnamed) input.
        return errors.xml_detail(
            err_domain, f"at line {line}: {_ENTITY_LOOP}\n{context}\n{pointer}"
        )
    return errors.xml_detail(err_domain, f"{url}:{line}: {message}\n{context}\n{pointer}")


def parse_document(
    xml: str | bytes,
    *,
    url: str,
    root: str,
    err_domain: int,
    schema: str | None = None,
) -> etree._Element:
    """Parse `xml` as libvirt's virXMLParse would; raise libvirtError with libvirt's texts.

    `url` is libvirt's document label, e.g. "(domain_checkpoint)"; `root` the required root element;
    `schema` the RNG file name to validate against (skipped when the schemas are not installed).
    """
    data = xml.encode("utf-8") if isinstance(xml, str) else xml
    source = data.decode("utf-8", errors="replace")
    parser = _parser()
    try:
        doc = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise _syntax_error(source, url, err_domain, exc, parser.error_log) from None
    name = etree.QName(doc).localname
    if name != root:
        raise errors.XML_ROOT_MISMATCH(root, name)
    if schema is not None:
        validate(doc, schema)
    return doc


@functools.cache
def _relaxng(schema: str) -> etree.RelaxNG | None:
    path = SCHEMA_DIR / schema
    if not path.is_file():
        return None
    # The schemas themselves are trusted local files; include/href resolution stays local.
    return etree.RelaxNG(etree.parse(str(path)))


def schemas_available() -> bool:
    """Whether libvirt's RNG schemas (Debian package libvirt0) are installed here."""
    return (SCHEMA_DIR / "domaincommon.rng").is_file()


def validate(doc: etree._Element, schema: str) -> None:
    """Validate against libvirt's RNG `schema`; VIR_ERR_XML_INVALID_SCHEMA with libxml2's lines."""
    rng = _relaxng(schema)
    if rng is None or rng.validate(doc):
        return
    raise errors.xml_invalid_schema(str(SCHEMA_DIR / schema), [e.message for e in rng.error_log])


def text_of(el: etree._Element | None) -> str | None:
    """An element's character content as libvirt reads it (xmlNodeGetContent), None if absent.

    Entity references stay unresolved in the tree; a reference to an internal entity whose value is
    plain text contributes that text (as libxml2 would), anything else contributes nothing.
    """
    if el is None:
        return None
    parts: list[str] = [el.text or ""]
    for child in el:
        if isinstance(child, etree._Entity):
            parts.append(_entity_value(child))
        elif isinstance(child.tag, str):
            parts.append(text_of(child) or "")
        parts.append(child.tail or "")
    return "".join(parts)


def _entity_value(ref: etree._Entity) -> str:
    dtd = ref.getroottree().docinfo.internalDTD
    if dtd is None:
        return ""
    for ent in dtd.iterentities():
        if ent.name == ref.name:
            value = ent.content or ""
            return "" if ("&" in value or "<" in value or ent.system_url) else value
    return ""
