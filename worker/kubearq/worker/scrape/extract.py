"""What a scraped page yields: detail-page links from a listing page, schema.org JSON-LD items or CSS fields.

Pure functions over the fetched (already decoded) HTML; no I/O. Parsing uses lexbor, which, like a browser,
builds a tree from any input, however malformed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeAlias, cast
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

from selectolax.lexbor import LexborHTMLParser, LexborNode

from kubearq.core.contract import LinkDiscovery, split_field_selector
from kubearq.worker.scrape.schemaorg import is_of_type, with_subtypes

JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"
JsonObject: TypeAlias = "dict[str, JsonValue]"

__all__ = [
    "JsonLdResult",
    "JsonObject",
    "JsonValue",
    "SkippedBlock",
    "extract_css",
    "extract_json_ld",
    "find_links",
]


# --- Links ---------------------------------------------------------------------------------------------------

# What the URL standard strips around an href and deletes inside it (https://url.spec.whatwg.org/#concept-basic-url-parser).
_URL_EDGE = "".join(map(chr, range(0x21)))
_URL_TAB_OR_NEWLINE = re.compile(r"[\t\n\r]")
# Characters allowed in a path or query as they are; anything else (spaces, non-ASCII, quotes) is percent-encoded
# the way a browser sends it, and existing %XX escapes are kept.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Code points a browser refuses in a host (https://url.spec.whatwg.org/#forbidden-domain-code-point), the
# colon aside, which separates an IPv6 address.
_FORBIDDEN_IN_HOST = re.compile(r"[\x00-\x20#%/<>?@\[\\\]^|\x7f]")


def find_links(html: str, base_url: str, discovery: LinkDiscovery) -> list[str]:
    """Absolute http(s) URLs of the elements matching `discovery.selector`, in page order, each once.

    `base_url` is the listing page's URL (after redirects); relative links resolve against it and the page's
    `<base href>`. Fragments are dropped, scheme and host lowercased, default ports removed. With `same_site`,
    only links to the listing page's exact host are kept (`www.example.com` is another host than
    `example.com`; scheme and port may differ). Links back to the listing page itself are dropped. Not capped:
    `max_detail_pages` counts over the whole request, so the caller applies it.
    """
    tree = LexborHTMLParser(html)
    page = _normalize_url(base_url.strip())
    if page is None:
        raise ValueError(f"{base_url!r} is not an absolute http(s) URL; the listing page's URL is needed")
    document_base = _document_base(tree, page.url)
    pattern = re.compile(discovery.pattern) if discovery.pattern else None
    links: dict[str, None] = {}
    for element in tree.css(discovery.selector):
        href = element.attributes.get("href")
        if href is None:
            continue
        link = _resolve(href, document_base)
        if link is None or link.url == page.url or link.url in links:
            continue
        if discovery.same_site and link.host != page.host:
            continue
        if pattern is not None and not pattern.search(link.url):
            continue
        links[link.url] = None
    return list(links)


class _Url(NamedTuple):
    url: str
    """Canonical: scheme and host lowercased, no default port, no fragment, unsafe characters percent-encoded."""
    host: str
    """Lowercased, without brackets (IPv6) or a trailing dot."""


def _document_base(tree: LexborHTMLParser, page: str) -> str:
    # The first <base> with an href sets the document's base URL (HTML §4.2.3); one that is not http(s) is ignored.
    base = tree.css_first("base[href]")
    if base is not None:
        resolved = _resolve(base.attributes.get("href") or "", page)
        if resolved is not None:
            return resolved.url
    return page


def _resolve(href: str, base: str) -> _Url | None:
    """`href` made absolute against `base` as a browser would, or None when it is no http(s) URL."""
    href = _URL_TAB_OR_NEWLINE.sub("", href.strip(_URL_EDGE))
    # Browsers read a backslash as a slash in http(s) URLs, so `\\evil.example` leads to another host.
    href = href.replace("\\", "/")
    try:
        return _normalize_url(urljoin(base, href))
    except ValueError:  # an invalid IPv6 literal: no link a browser could follow either
        return None


def _normalize_url(url: str) -> _Url | None:
    """The URL in one canonical form (so that duplicates compare equal), or None when it is no http(s) URL."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        return None
    host = (parts.hostname or "").rstrip(".")
    if parts.scheme not in _DEFAULT_PORTS or not host or _FORBIDDEN_IN_HOST.search(host):
        return None
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[parts.scheme]:
        netloc = f"{netloc}:{port}"
    userinfo = parts.netloc.rpartition("@")[0]
    if userinfo:
        netloc = f"{userinfo}@{netloc}"
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    query = quote(parts.query, safe=_QUERY_SAFE)
    return _Url(urlunsplit((parts.scheme, netloc, path, query, "")), host)


# --- JSON-LD -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkippedBlock:
    """A `<script type="application/ld+json">` block that could not be read, even leniently."""

    index: int
    """Position among the page's JSON-LD blocks, from 0."""
    error: str
    """Why strict JSON parsing failed (with line and column)."""


@dataclass(frozen=True)
class JsonLdResult:
    """The items of the asked types found on a page, and the blocks that had to be skipped."""

    items: list[JsonObject] = field(default_factory=list)
    skipped: list[SkippedBlock] = field(default_factory=list)


_LD_JSON = "application/ld+json"
# Wrappers that keep old browsers and XHTML parsers from reading the script: <!-- -->, <![CDATA[ ]]>, and the
# commented forms `//<![CDATA[` and `/*<![CDATA[*/`.
_WRAPPER_START = re.compile(r"[\s\ufeff]*+(?:<!--|(?://|/\*)?\s*<!\[CDATA\[(?:\s*\*/)?)?")
_WRAPPER_END = re.compile(r"(?:-->|(?://|/\*)?\s*\]\]>(?:\s*\*/)?)\s*\Z")
_WRAPPER_END_WINDOW = 64  # searched for in the block's tail only: a search of the whole block could be quadratic
# The lenient pass scans strings as units so that nothing inside one is touched by the other rules. Every
# pattern here matches in time linear in the block, even on hostile input: a string or comment left open runs
# to the end of the block (where the JSON parser then fails) instead of being retried from every later quote.
_STRING = r'"(?:[^"\\]++|\\.?)*+(?:"|\Z)'
_LENIENT_TOKENS = re.compile(
    rf"(?P<string>{_STRING})|(?P<comment>//[^\n]*+|/\*.*?(?:\*/|\Z))|(?P<trailing_comma>,(?=\s*+[}}\]]))",
    re.DOTALL,
)
_ESCAPE = re.compile(r"\\(u[0-9A-Fa-f]{4}|.)", re.DOTALL)
_JSON_ESCAPES = frozenset('"\\/bfnrt')
_BETWEEN_VALUES = re.compile(r"[\s;,]*")


def extract_json_ld(html: str, types: Sequence[str], *, include_nested: bool = False) -> JsonLdResult:
    """The JSON-LD items of `types` or their schema.org subtypes, as published, in page order, each once.

    Items are found wherever they sit: a block's object, top-level arrays, `@graph` (nested too) and the
    properties of items of other types (an ItemList's `itemListElement[].item`, a WebPage's `mainEntity`, a
    Place's `event`). An item found inside a matching item (an Event's `subEvent`) is part of that item and only
    reported on its own with `include_nested`. A block that is not JSON even after lenient repair is skipped,
    and reported in `skipped`, without losing the others.
    """
    wanted = with_subtypes([types] if isinstance(types, str) else types)  # "Event" is one type, not five letters
    result = JsonLdResult()
    seen: set[str] = set()
    for index, text in enumerate(_json_ld_blocks(LexborHTMLParser(html))):
        try:
            document = _parse_json_ld(text)
        except ValueError as error:
            result.skipped.append(SkippedBlock(index=index, error=str(error)))
            continue
        for item in _matching_items(document, wanted, include_nested):
            # Identical items (a page repeating its Event in two blocks) are stored once; items that merely
            # share an @id are kept as published, since merging JSON-LD nodes would rewrite them.
            key = json.dumps(item, sort_keys=True, ensure_ascii=False)
            if key not in seen:
                seen.add(key)
                result.items.append(item)
    return result


def _json_ld_blocks(tree: LexborHTMLParser) -> Iterator[str]:
    for script in tree.css("script[type]"):
        media_type = (script.attributes.get("type") or "").partition(";")[0].strip().lower()
        if media_type == _LD_JSON:
            yield script.text(deep=True)


def _parse_json_ld(text: str) -> JsonValue:
    """The block's JSON: strict first, then with the mistakes common in the wild repaired."""
    text = _unwrap(text)
    try:
        return _loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to parse") from None
    except ValueError as strict_error:
        try:
            return _loads_lenient(text)
        except (ValueError, RecursionError):
            raise strict_error from None


def _unwrap(text: str) -> str:
    start = _WRAPPER_START.match(text)
    text = text[start.end() :].rstrip() if start else text.rstrip()
    end = _WRAPPER_END.search(text, max(0, len(text) - _WRAPPER_END_WINDOW))
    return text[: end.start()] if end else text


def _loads(text: str, *, strict: bool = True) -> JsonValue:
    # NaN and Infinity are no JSON, and PostgreSQL's jsonb refuses them: they are read as null.
    return cast(JsonValue, json.loads(text, strict=strict, parse_constant=lambda _: None))


def _loads_lenient(text: str) -> JsonValue:
    """Control characters in strings, invalid escapes (`\\'`), comments, trailing commas, and several values
    in one block (`{…}{…}` or `{…};`, read as a list) are tolerated."""

    def repair_escape(match: re.Match[str]) -> str:
        escaped = match[1]
        return match[0] if len(escaped) == 5 or escaped in _JSON_ESCAPES else escaped

    def repair(match: re.Match[str]) -> str:
        if match["string"] is not None:
            return _ESCAPE.sub(repair_escape, match["string"])
        return ""

    text = _LENIENT_TOKENS.sub(repair, text)
    decoder = json.JSONDecoder(strict=False, parse_constant=lambda _: None)
    values: list[JsonValue] = []
    position = _skip_separators(text, 0)
    while position < len(text):
        value, position = decoder.raw_decode(text, position)
        values.append(cast(JsonValue, value))
        position = _skip_separators(text, position)
    if not values:
        raise ValueError("empty block")
    return values[0] if len(values) == 1 else values


def _skip_separators(text: str, position: int) -> int:
    separators = _BETWEEN_VALUES.match(text, position)
    return separators.end() if separators else position


def _matching_items(document: JsonValue, wanted: frozenset[str], include_nested: bool) -> Iterator[JsonObject]:
    # Depth-first in document order, without recursion: a hostile page may nest thousands of levels.
    pending: list[tuple[JsonValue, bool]] = [(document, False)]
    while pending:
        value, inside_match = pending.pop()
        if isinstance(value, list):
            pending.extend((element, inside_match) for element in reversed(value))
        elif isinstance(value, dict):
            matches = is_of_type(value.get("@type"), wanted)
            if matches and (include_nested or not inside_match):
                yield value
            if matches and not include_nested:
                continue
            pending.extend(
                (child, inside_match or matches)
                for key, child in reversed(value.items())
                if key != "@context"  # term definitions, not data
            )


# --- CSS fields ----------------------------------------------------------------------------------------------

# Elements that start a new line in rendered text; inline elements (span, b, a) join their neighbours, as in
# a browser's innerText, so `<span>Sat</span><span>14</span>` reads "Sat14" and `<p>a</p><p>b</p>` "a b".
_BLOCK_TAGS = frozenset((
    "address", "article", "aside", "blockquote", "br", "dd", "details", "dialog", "div", "dl", "dt", "fieldset",
    "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hgroup", "hr",
    "li", "main", "nav", "ol", "p", "pre", "section", "summary", "table", "tbody", "td", "tfoot", "th", "thead",
    "tr", "ul",
))
_HIDDEN_TAGS = frozenset(("script", "style", "template", "noscript", "head", "title"))
_WHITESPACE = re.compile(r"\s+")


def extract_css(html: str, fields: Mapping[str, str]) -> dict[str, str | None]:
    """Each field's value from the first element matching its selector: the element's text (whitespace
    collapsed) or, for `selector @attr`, the attribute's value (stripped). None when nothing matches or the
    element lacks the attribute.
    """
    tree = LexborHTMLParser(html)
    values: dict[str, str | None] = {}
    for name, spec in fields.items():
        selector, attribute = split_field_selector(spec)
        element = tree.css_first(selector)
        if element is None:
            values[name] = None
        elif attribute is None:
            values[name] = _rendered_text(element)
        else:
            attributes = element.attributes
            # HTML attribute names are case-insensitive; the parser stores them lowercased.
            key = attribute.lower()
            # A bare attribute (`<option selected>`) has the empty string as its value.
            values[name] = (attributes[key] or "").strip() if key in attributes else None
    return values


def _rendered_text(element: LexborNode) -> str:
    pieces: list[str] = []
    # Without recursion (pages nest deeply); a str on the stack is text to emit once a block's children are done.
    pending: list[LexborNode | str | None] = [element.first_child]
    while pending:
        node = pending.pop()
        if node is None:
            continue
        if isinstance(node, str):
            pieces.append(node)
            continue
        pending.append(node.next)
        if node.is_text_node:
            pieces.append(node.text_content or "")
        elif node.is_element_node and node.tag not in _HIDDEN_TAGS:
            if node.tag in _BLOCK_TAGS:
                pieces.append(" ")
                pending.append(" ")
            pending.append(node.first_child)
    return _WHITESPACE.sub(" ", "".join(pieces)).strip()
