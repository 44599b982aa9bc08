"""Text output in libvirt's own XML style (virbuffer.c / virXMLFormatElement).

libvirt does not serialize a DOM: it prints each element itself, two spaces per level, attributes
in single quotes, childless elements as `<x/>`, text-only elements on one line, and escapes all of
< > & ' " in both text and attribute values. Clients diff and grep this output, so virtsim prints
it the same way rather than through lxml's serializer.
"""

from __future__ import annotations

from collections.abc import Sequence

from lxml import etree

Attrs = Sequence[tuple[str, str | int | None]]

_ESCAPES = {"<": "&lt;", ">": "&gt;", "&": "&amp;", '"': "&quot;", "'": "&apos;"}


def escape(value: str) -> str:
    """virBufferEscapeString: the five XML specials become entities, other control chars vanish."""
    out = []
    for ch in value:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 and ch not in "\t\n\r":
            continue
        else:
            out.append(ch)
    return "".join(out)


def _attr_text(attrs: Attrs) -> str:
    return "".join(f" {k}='{escape(str(v))}'" for k, v in attrs if v is not None)


class XMLWriter:
    """Accumulates libvirt-style lines; `value()` is the document with its final newline."""

    def __init__(self, indent: int = 0) -> None:
        self._lines: list[str] = []
        self._depth = indent

    def _add(self, text: str) -> None:
        self._lines.append("  " * self._depth + text)

    def empty(self, tag: str, attrs: Attrs = ()) -> None:
        self._add(f"<{tag}{_attr_text(attrs)}/>")

    def text(self, tag: str, value: str | int | None, attrs: Attrs = ()) -> None:
        """`<tag>value</tag>`; nothing at all when value is None (libvirt skips unset fields)."""
        if value is None:
            return
        self._add(f"<{tag}{_attr_text(attrs)}>{escape(str(value))}</{tag}>")

    def open(self, tag: str, attrs: Attrs = ()) -> None:
        self._add(f"<{tag}{_attr_text(attrs)}>")
        self._depth += 1

    def close(self, tag: str) -> None:
        self._depth -= 1
        self._add(f"</{tag}>")

    def lines(self, text: str) -> None:
        """Insert already formatted XML (e.g. a nested <domain>) at the current depth."""
        for line in text.splitlines():
            self._add(line)

    def element(self, el: etree._Element, *, ns_last: bool = False) -> None:
        """Print a kept (not simulated) subtree in libvirt's style, namespaces preserved.

        `ns_last`: namespace declarations after the attributes, as libvirt prints its <domain>.
        """
        self._element(el, {}, ns_last)

    def _element(
        self, el: etree._Element, parent_ns: dict[str | None, str], ns_last: bool = False
    ) -> None:
        name = _qualified(str(el.tag), el.nsmap)
        decls: list[tuple[str, str | int | None]] = [
            ("xmlns" if prefix is None else f"xmlns:{prefix}", uri)
            for prefix, uri in el.nsmap.items()
            if parent_ns.get(prefix) != uri
        ]
        own: list[tuple[str, str | int | None]] = [
            (_qualified(str(k), el.nsmap), str(v)) for k, v in el.attrib.items()
        ]
        attrs = own + decls if ns_last else decls + own
        children = [ch for ch in el if isinstance(ch.tag, str)]
        text = (el.text or "").strip()
        if not children:
            if text:
                self._add(f"<{name}{_attr_text(attrs)}>{escape(text)}</{name}>")
            else:
                self.empty(name, attrs)
            return
        self.open(name, attrs)
        if text:
            self._add(escape(text))
        ns = dict(el.nsmap)
        for child in children:
            self._element(child, ns)
            tail = (child.tail or "").strip()
            if tail:
                self._add(escape(tail))
        self.close(name)

    def value(self) -> str:
        return "".join(f"{line}\n" for line in self._lines)


def _qualified(tag: str, nsmap: dict[str | None, str]) -> str:
    qn = etree.QName(tag)
    if qn.namespace is None:
        return qn.localname
    for prefix, uri in nsmap.items():
        if uri == qn.namespace and prefix is not None:
            return f"{prefix}:{qn.localname}"
    return qn.localname
