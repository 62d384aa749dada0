"""Extraction from fetched HTML: detail links, schema.org JSON-LD items, CSS fields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubearq.core.contract import LinkDiscovery
from kubearq.worker.scrape.extract import JsonObject, JsonValue, extract_css, extract_json_ld, find_links

CORPUS = Path(__file__).parents[2] / "shared" / "corpora" / "jsonld"
CORPUS_PAGES = (
    [pytest.param(page, id=page.stem) for page in sorted(CORPUS.glob("*.html"))]
    if CORPUS.is_dir()
    else [pytest.param(None, marks=pytest.mark.skip(reason=f"no corpus at {CORPUS}"))]
)


def page_with(*blocks: str, body: str = "") -> str:
    scripts = "".join(f'<script type="application/ld+json">{block}</script>' for block in blocks)
    return f"<!DOCTYPE html><html><head><title>t</title>{scripts}</head><body>{body}</body></html>"


def event(name: str, type_: JsonValue = "Event", **more: JsonValue) -> JsonObject:
    return {"@context": "https://schema.org", "@type": type_, "name": name, **more}


def names(items: list[JsonObject]) -> list[JsonValue]:
    return [item.get("name") for item in items]


# --- The corpus of real pages --------------------------------------------------------------------------------


def expected_of(page: Path) -> dict[str, Any]:
    """The page's `.expected.json`: `events` (top-level items), `nested_events`, and counts of blocks and items."""
    expected: dict[str, Any] = json.loads(page.with_name(f"{page.stem}.expected.json").read_text(encoding="utf-8"))
    return expected


def assert_items_match(items: list[JsonObject], expected: list[dict[str, JsonValue]]) -> None:
    """Each expected entry lists some fields of one item (null: the field is absent); `via` says where it sat."""
    assert len(items) == len(expected), names(items)
    for item, fields in zip(items, expected, strict=True):
        assert {key: item.get(key) for key in fields if key != "via"} == {
            key: value for key, value in fields.items() if key != "via"
        }


@pytest.mark.parametrize("page", CORPUS_PAGES)
def test_corpus_pages_yield_their_expected_events(page: Path) -> None:
    result = extract_json_ld(page.read_text(encoding="utf-8"), ["Event"])

    assert_items_match(result.items, expected_of(page)["events"])


@pytest.mark.parametrize("page", CORPUS_PAGES)
def test_corpus_pages_yield_nested_events_too_when_asked(page: Path) -> None:
    expected = expected_of(page)

    result = extract_json_ld(page.read_text(encoding="utf-8"), ["Event"], include_nested=True)

    assert_items_match(result.items, expected["events"] + expected.get("nested_events", []))


@pytest.mark.parametrize("page", CORPUS_PAGES)
def test_corpus_pages_have_no_unreadable_block(page: Path) -> None:
    result = extract_json_ld(page.read_text(encoding="utf-8"), ["Thing"])

    assert result.skipped == []
    if "jsonld_items_total" in (expected := expected_of(page)):
        assert len(result.items) == expected["jsonld_items_total"]


# --- JSON-LD types -------------------------------------------------------------------------------------------

EVENT_SUBTYPES = [
    "BusinessEvent", "ChildrensEvent", "ComedyEvent", "CourseInstance", "DanceEvent", "DeliveryEvent",
    "EducationEvent", "EventSeries", "ExhibitionEvent", "Festival", "FoodEvent", "Hackathon", "LiteraryEvent",
    "MusicEvent", "PublicationEvent", "BroadcastEvent", "OnDemandEvent", "SaleEvent", "ScreeningEvent",
    "SocialEvent", "SportsEvent", "TheaterEvent", "UserInteraction", "UserBlocks", "UserCheckins", "UserComments",
    "UserDownloads", "UserLikes", "UserPageVisits", "UserPlays", "UserPlusOnes", "UserTweets", "VisualArtsEvent",
]  # fmt: skip


@pytest.mark.parametrize("subtype", EVENT_SUBTYPES)
def test_event_subtypes_are_events(subtype: str) -> None:
    html = page_with(json.dumps(event("x", subtype)))

    assert extract_json_ld(html, ["Event"]).items == [event("x", subtype)]


@pytest.mark.parametrize(
    ("asked", "published"),
    [
        ("Product", "Product"),
        ("Product", "IndividualProduct"),
        ("Product", "Car"),
        ("Product", "ProductGroup"),
        ("Organization", "Corporation"),
        ("Organization", "NGO"),
        ("Organization", "Restaurant"),
        ("Organization", "SportsTeam"),
        ("LocalBusiness", "Restaurant"),
        ("LocalBusiness", "Hotel"),
        ("LocalBusiness", "Dentist"),
        ("LocalBusiness", "AutoRepair"),
        ("LocalBusiness", "Store"),
        ("LocalBusiness", "BookStore"),
        ("LocalBusiness", "BarOrPub"),
        ("Place", "LocalBusiness"),
        ("Place", "Restaurant"),
        ("Place", "MusicVenue"),
        ("Place", "City"),
        ("Article", "NewsArticle"),
        ("Article", "BlogPosting"),
        ("Article", "LiveBlogPosting"),
        ("Article", "ReportageNewsArticle"),
        ("CreativeWork", "Recipe"),
        ("HowTo", "Recipe"),
        ("Recipe", "Recipe"),
        ("JobPosting", "JobPosting"),
    ],
)
def test_other_common_types_match_their_subtypes(asked: str, published: str) -> None:
    html = page_with(json.dumps({"@type": published, "name": "x"}))

    assert names(extract_json_ld(html, [asked]).items) == ["x"]


def test_a_supertype_is_not_its_subtype() -> None:
    html = page_with(json.dumps(event("plain")), json.dumps(event("music", "MusicEvent")))

    assert names(extract_json_ld(html, ["MusicEvent"]).items) == ["music"]


def test_several_asked_types_match_in_page_order() -> None:
    html = page_with(
        json.dumps({"@type": "Product", "name": "p"}),
        json.dumps({"@type": "Person", "name": "someone"}),
        json.dumps(event("e", "Festival")),
    )

    assert names(extract_json_ld(html, ["Event", "Product"]).items) == ["p", "e"]


def test_type_list_matches_when_any_type_matches() -> None:
    html = page_with(json.dumps(event("listed", ["Thing", "schema:MusicEvent"])))

    assert names(extract_json_ld(html, ["Event"]).items) == ["listed"]


@pytest.mark.parametrize(
    "type_",
    ["schema:Event", "http://schema.org/Event", "https://schema.org/MusicEvent", "https://www.schema.org/Event/",
     "HTTPS://SCHEMA.ORG/SportsEvent", " Event ", "musicevent"],
)  # fmt: skip
def test_prefixed_and_miscased_types_match(type_: str) -> None:
    html = page_with(json.dumps(event("x", type_)))

    assert names(extract_json_ld(html, ["Event"]).items) == ["x"]


@pytest.mark.parametrize("type_", ["og:Event", "http://example.org/Event", "EventVenue", "", 7, None, {"a": 1}])
def test_other_vocabularies_and_odd_types_do_not_match(type_: JsonValue) -> None:
    html = page_with(json.dumps(event("x", type_)))

    assert extract_json_ld(html, ["Event"]).items == []


def test_a_single_type_may_be_given_as_a_string() -> None:
    html = page_with(json.dumps(event("x", "MusicEvent")), json.dumps({"@type": "E", "name": "letter"}))

    assert names(extract_json_ld(html, "Event").items) == ["x"]


def test_a_type_unknown_to_schema_org_matches_itself_only() -> None:
    html = page_with(json.dumps([{"@type": "Gig", "name": "a"}, {"@type": "GigSeries", "name": "b"}]))

    assert names(extract_json_ld(html, ["Gig"]).items) == ["a"]


# --- JSON-LD: where items sit --------------------------------------------------------------------------------


def test_items_in_graph_and_nested_graph() -> None:
    block = {
        "@context": "https://schema.org",
        "@graph": [
            {"@type": "WebSite", "name": "site"},
            event("first"),
            {"@graph": [event("second", "TheaterEvent")]},
        ],
    }

    assert names(extract_json_ld(page_with(json.dumps(block)), ["Event"]).items) == ["first", "second"]


def test_items_in_a_top_level_array() -> None:
    html = page_with(json.dumps([event("a"), {"@type": "Place", "name": "p"}, event("b", "SportsEvent")]))

    assert names(extract_json_ld(html, ["Event"]).items) == ["a", "b"]


def test_items_inside_items_of_other_types() -> None:
    item_list = {
        "@type": "ItemList",
        "itemListElement": [
            {"@type": "ListItem", "position": 1, "item": event("listed 1")},
            {"@type": "ListItem", "position": 2, "item": event("listed 2", "DanceEvent")},
        ],
    }
    web_page = {"@type": "WebPage", "mainEntity": event("main")}

    result = extract_json_ld(page_with(json.dumps(item_list), json.dumps(web_page)), ["Event"])

    assert names(result.items) == ["listed 1", "listed 2", "main"]


def test_sub_events_stay_inside_their_event_unless_nested_items_are_asked() -> None:
    festival = event("festival", "Festival", subEvent=[event("day 1"), event("day 2")])
    html = page_with(json.dumps(festival))

    assert extract_json_ld(html, ["Event"]).items == [festival]
    assert names(extract_json_ld(html, ["Event"], include_nested=True).items) == ["festival", "day 1", "day 2"]


def test_items_are_returned_as_published() -> None:
    published = event("x", ["MusicEvent", "Thing"], location={"@type": "Place", "name": "Hall"}, offers=[], n=1.5)

    (item,) = extract_json_ld(page_with(json.dumps(published)), ["Event"]).items

    assert item == published


def test_an_item_repeated_on_the_page_is_returned_once() -> None:
    once = event("same", startDate="2030-01-01")
    html = page_with(json.dumps(once), json.dumps({"@graph": [once, event("other")]}), json.dumps([once]))

    assert names(extract_json_ld(html, ["Event"]).items) == ["same", "other"]


def test_items_sharing_an_id_but_differing_are_both_kept() -> None:
    html = page_with(json.dumps([event("short", **{"@id": "#e"}), event("long", **{"@id": "#e"}, url="/e")]))

    assert names(extract_json_ld(html, ["Event"]).items) == ["short", "long"]


def test_context_definitions_are_not_searched() -> None:
    block = {"@context": {"@vocab": "https://schema.org/", "x": {"@type": "Event", "name": "term"}}, "@type": "Thing"}

    assert extract_json_ld(page_with(json.dumps(block)), ["Event"]).items == []


# --- JSON-LD: blocks as found in the wild --------------------------------------------------------------------


@pytest.mark.parametrize(
    "type_attribute",
    ["application/ld+json", "Application/LD+JSON", "application/ld+json; charset=utf-8", " application/ld+json "],
)
def test_script_type_is_case_insensitive_and_may_carry_parameters(type_attribute: str) -> None:
    html = f'<script type="{type_attribute}">{json.dumps(event("x"))}</script>'

    assert names(extract_json_ld(html, ["Event"]).items) == ["x"]


@pytest.mark.parametrize("type_attribute", ["application/json", "text/javascript", "application/ld+json5", None])
def test_other_scripts_are_ignored(type_attribute: str | None) -> None:
    attribute = f' type="{type_attribute}"' if type_attribute else ""
    html = f"<script{attribute}>{json.dumps(event('x'))}</script>"

    assert extract_json_ld(html, ["Event"]).items == []


@pytest.mark.parametrize(
    "wrapped",
    [
        "<!--{}-->",
        "\n  <!--\n{}\n  -->\n",
        "<![CDATA[{}]]>",
        "//<![CDATA[\n{}\n//]]>",
        "/*<![CDATA[*/{}/*]]>*/",
        "\ufeff{}",
    ],
)
def test_comment_and_cdata_wrappers_are_removed(wrapped: str) -> None:
    html = page_with(wrapped.format(json.dumps(event("wrapped"))))

    result = extract_json_ld(html, ["Event"])

    assert (names(result.items), result.skipped) == (["wrapped"], [])


@pytest.mark.parametrize(
    ("block", "name"),
    [
        ('{"@type": "Event", "name": "trailing comma", "offers": [1, 2,],}', "trailing comma"),
        ('{"@type": "Event", "name": "line\nbreak\tand tab"}', "line\nbreak\tand tab"),
        ('{"@type": "Event", "name": "it\\\'s escaped"}', "it's escaped"),
        ('{"@type": "Event", /* a note */ "name": "comments", // another\n "url": "https://e.example/x"}', "comments"),
        ('{"@type": "Event", "name": "semicolon"};', "semicolon"),
        ('{"@type": "Event", "name": "keeps, }"  ,  }', "keeps, }"),
    ],
)
def test_common_json_mistakes_are_repaired(block: str, name: str) -> None:
    result = extract_json_ld(page_with(block), ["Event"])

    assert (names(result.items), result.skipped) == ([name], [])


def test_a_repair_keeps_valid_escapes_and_drops_only_invalid_backslashes() -> None:
    # An escaped backslash before a quote, PHP's \', a \u without hex digits, escaped double quotes.
    block = r"""{"@type": "Event", "name": "a\\'b \'c\' \u00e9 \ux \"q\"", "x": 1,}"""

    (item,) = extract_json_ld(page_with(block), ["Event"]).items

    assert item["name"] == "a\\'b 'c' é ux \"q\""


def test_a_repair_leaves_strings_intact() -> None:
    block = '{"@type": "Event", "name": "a // b /* c */ ,]", "url": "https://e.example/x",}'

    (item,) = extract_json_ld(page_with(block), ["Event"]).items

    assert (item["name"], item["url"]) == ("a // b /* c */ ,]", "https://e.example/x")


def test_concatenated_values_in_one_block_are_all_read() -> None:
    block = json.dumps(event("one")) + "\n" + json.dumps(event("two"))

    assert names(extract_json_ld(page_with(block), ["Event"]).items) == ["one", "two"]


def test_an_unreadable_block_is_skipped_and_reported_without_losing_the_others() -> None:
    broken = '{"@type": "Event", "name": "broken" "x": }'
    html = page_with(json.dumps(event("before")), broken, json.dumps(event("after")))

    result = extract_json_ld(html, ["Event"])

    assert names(result.items) == ["before", "after"]
    assert [(skipped.index, skipped.error) for skipped in result.skipped] == [
        (1, "Expecting ',' delimiter: line 1 column 37 (char 36)")
    ]


@pytest.mark.parametrize("block", ["null", "", "   ", "42", '"text"', "true", "[]", "{}"])
def test_empty_and_scalar_blocks_yield_nothing(block: str) -> None:
    html = page_with(block, json.dumps(event("x")))

    assert names(extract_json_ld(html, ["Event"]).items) == ["x"]


def test_an_empty_block_is_reported() -> None:
    assert [skipped.index for skipped in extract_json_ld(page_with("", "  "), ["Event"]).skipped] == [0, 1]


def test_non_json_constants_are_read_as_null() -> None:
    html = page_with('{"@type": "Event", "name": "x", "price": NaN, "capacity": Infinity}')

    (item,) = extract_json_ld(html, ["Event"]).items

    assert (item["price"], item["capacity"]) == (None, None)


def test_script_content_is_not_html_decoded() -> None:
    html = page_with('{"@type": "Event", "name": "Tom &amp; Jerry <b>live</b>"}')

    assert names(extract_json_ld(html, ["Event"]).items) == ["Tom &amp; Jerry <b>live</b>"]


def test_a_block_nested_too_deeply_is_skipped() -> None:
    html = page_with("[" * 100_000 + "]" * 100_000, json.dumps(event("x")))

    result = extract_json_ld(html, ["Event"])

    assert names(result.items) == ["x"]
    assert [skipped.index for skipped in result.skipped] == [0]


def test_blocks_in_malformed_html_are_found() -> None:
    html = (
        "<html><body><div><p>unclosed <b>bold <table><tr><td>cell"
        f'<script type="application/ld+json">{json.dumps(event("in table"))}</script>'
        f'<span><script type="application/ld+json">{json.dumps(event("in span"))}</script>'
    )

    assert names(extract_json_ld(html, ["Event"]).items) == ["in table", "in span"]


@pytest.mark.parametrize(
    "hostile",
    ['"\\' * 100_000, "/*a" * 70_000, '"' * 200_001, ", " * 100_000, " " * 200_000 + "x", "<!--" + " " * 200_000 + "x"],
    ids=["open-escapes", "open-comments", "quotes", "commas", "spaces-then-junk", "comment-then-spaces"],
)
def test_hostile_blocks_are_reported_in_linear_time(hostile: str) -> None:
    # A quadratic repair would take minutes on these and hit the test timeout; linear takes milliseconds.
    result = extract_json_ld(page_with(hostile, json.dumps(event("x"))), ["Event"])

    assert (names(result.items), [skipped.index for skipped in result.skipped]) == (["x"], [0])


def test_a_one_megabyte_block() -> None:
    events = [event(f"event {n}", "MusicEvent", description="x" * 150, startDate="2030-01-01") for n in range(4000)]
    block = json.dumps({"@type": "ItemList", "itemListElement": [{"@type": "ListItem", "item": e} for e in events]})
    assert len(block) > 1_000_000

    result = extract_json_ld(page_with(block.replace("}]}", "},]}")), ["Event"])  # made lenient-only

    assert len(result.items) == 4000
    assert result.items[-1]["name"] == "event 3999"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from('{}[],:"\\/*<>!-tn ul\n\t\x00@Ee1.')))
def test_any_block_text_is_read_or_reported_never_raised(block: str) -> None:
    html = f'<script type="application/ld+json">{block}</script>'

    result = extract_json_ld(html, ["Event"])

    assert len(result.items) + len(result.skipped) >= 0


# --- CSS fields ----------------------------------------------------------------------------------------------

DETAIL_PAGE = """
<html><head><title>Concert</title><style>h1 { color: red }</style></head><body>
  <h1 class="title">
     The   Night
     Concert </h1>
  <div class="when"><time datetime=" 2030-05-01T20:00 " data-Zone="Europe/Berlin">May 1st</time></div>
  <div class="venue"><span>Big</span><span>Hall</span><p>Main St. 1</p><p>Berlin<br>Germany</p>
     <script>var hidden = 1;</script></div>
  <ul class="tags"><li>rock</li><li>live</li></ul>
  <a class="tickets" href="/buy">Tickets</a> <a class="tickets" href="/buy2">More</a>
  <option selected>VIP</option>
</body></html>
"""


def test_a_field_is_the_text_of_the_first_match_with_whitespace_collapsed() -> None:
    assert extract_css(DETAIL_PAGE, {"title": "h1.title", "link": "a.tickets"}) == {
        "title": "The Night Concert",
        "link": "Tickets",
    }


def test_block_elements_and_line_breaks_separate_words_and_inline_ones_do_not() -> None:
    assert extract_css(DETAIL_PAGE, {"venue": ".venue", "tags": "ul.tags"}) == {
        "venue": "BigHall Main St. 1 Berlin Germany",
        "tags": "rock live",
    }


def test_an_attribute_field_is_the_attribute_value() -> None:
    fields = {"start": "time @datetime", "zone": ".when time @data-zone", "tickets": "a.tickets @href"}

    assert extract_css(DETAIL_PAGE, fields) == {"start": "2030-05-01T20:00", "zone": "Europe/Berlin", "tickets": "/buy"}


def test_attribute_names_are_case_insensitive() -> None:
    assert extract_css(DETAIL_PAGE, {"start": "time @dateTime"}) == {"start": "2030-05-01T20:00"}


def test_a_bare_attribute_is_the_empty_string() -> None:
    assert extract_css(DETAIL_PAGE, {"selected": "option @selected"}) == {"selected": ""}


def test_missing_elements_and_attributes_are_none() -> None:
    fields = {"price": ".price", "end": "time @data-end", "empty": "script @src"}

    assert extract_css(DETAIL_PAGE, fields) == {"price": None, "end": None, "empty": None}


def test_an_empty_element_is_the_empty_string() -> None:
    assert extract_css("<p class=a></p><p class=b> \n </p>", {"a": "p.a", "b": "p.b"}) == {"a": "", "b": ""}


def test_fields_from_malformed_html() -> None:
    html = "<div class=x><p>one<p>two <span class=y>three</div><table><tr><td>cell"

    values = extract_css(html, {"x": "div.x", "y": ".y", "cell": "td"})

    assert values == {"x": "one two three", "y": "three", "cell": "cell"}


# --- Links ---------------------------------------------------------------------------------------------------

LISTING = "https://events.example/city/listing?page=1"


def links(body: str, discovery: LinkDiscovery | None = None, *, head: str = "", url: str = LISTING) -> list[str]:
    return find_links(f"<html><head>{head}</head><body>{body}</body></html>", url, discovery or LinkDiscovery())


def test_relative_links_resolve_against_the_page() -> None:
    body = (
        '<a href="e/1">1</a><a href="/e/2">2</a><a href="../e/3">3</a><a href="?page=2">p</a>'
        '<a href="//events.example/4">4</a>'
    )

    assert links(body) == [
        "https://events.example/city/e/1",
        "https://events.example/e/2",
        "https://events.example/e/3",
        "https://events.example/city/listing?page=2",
        "https://events.example/4",
    ]


def test_links_resolve_against_the_base_element() -> None:
    body = '<a href="e/1">1</a><a href="/e/2">2</a>'

    assert links(body, head='<base href="/archive/2030/"><base href="/ignored/">') == [
        "https://events.example/archive/2030/e/1",
        "https://events.example/e/2",
    ]


def test_a_base_element_that_is_not_http_is_ignored() -> None:
    assert links('<a href="e/1">1</a>', head='<base href="javascript:alert(1)">') == ["https://events.example/city/e/1"]


def test_fragments_are_removed_and_links_to_the_page_itself_dropped() -> None:
    body = '<a href="#top">top</a><a href="">self</a><a href="/e/1#details">1</a><a href="/e/1#map">1 again</a>'

    assert links(body) == ["https://events.example/e/1"]


def test_only_the_listing_pages_exact_host_by_default() -> None:
    body = (
        '<a href="https://events.example/e/1">same</a><a href="http://EVENTS.example:80/e/2">same, http</a>'
        '<a href="https://www.events.example/e/3">www</a><a href="https://tickets.example/e/4">other</a>'
        '<a href="https://events.example.evil.example/e/5">lookalike</a>'
        '<a href="https://events.example@evil.example/e/6">userinfo</a>'
        '<a href="\\\\evil.example/e/7">backslashes</a>'
    )

    assert links(body) == ["https://events.example/e/1", "http://events.example/e/2"]


def test_other_hosts_are_followed_when_same_site_is_off() -> None:
    body = '<a href="https://www.events.example/e/3">www</a><a href="https://tickets.example/e/4">other</a>'

    assert links(body, LinkDiscovery(same_site=False)) == [
        "https://www.events.example/e/3",
        "https://tickets.example/e/4",
    ]


def test_the_pattern_is_searched_in_the_absolute_url() -> None:
    body = '<a href="/event/1">1</a><a href="/venue/2">2</a><a href="concert/event/3?x=1">3</a>'

    assert links(body, LinkDiscovery(pattern=r"/event/\d+")) == [
        "https://events.example/event/1",
        "https://events.example/city/concert/event/3?x=1",
    ]


def test_the_pattern_can_anchor_on_the_scheme_and_host() -> None:
    body = '<a href="/e/1">1</a><a href="http://events.example/e/2">2</a>'

    assert links(body, LinkDiscovery(pattern=r"^https://events\.example/")) == ["https://events.example/e/1"]


def test_the_selector_chooses_the_link_elements() -> None:
    body = '<nav><a href="/about">about</a></nav><a class="event" href="/e/1">1</a><div class="event">no href</div>'

    assert links(body, LinkDiscovery(selector=".event")) == ["https://events.example/e/1"]


def test_duplicates_are_removed_keeping_the_first_seen_order() -> None:
    body = (
        '<a href="/e/2">2</a><a href="/e/1">1</a><a href="https://EVENTS.EXAMPLE:443/e/2">2</a>'
        '<a href="/e/1#x">1</a><a href="e/../../e/2">2</a>'
    )

    assert links(body) == ["https://events.example/e/2", "https://events.example/e/1"]


@pytest.mark.parametrize(
    "href",
    ["javascript:void(0)", " JavaScript:alert(1)", "mailto:a@events.example", "tel:+4912345", "data:text/html,x",
     "ftp://events.example/f", "https://", "http://[::1", "https://events.example:99999/x", "https://exa mple/x"],
)  # fmt: skip
def test_links_that_are_not_http_urls_are_dropped(href: str) -> None:
    assert links(f'<a href="{href}">x</a>', LinkDiscovery(same_site=False)) == []


def test_whitespace_in_hrefs_is_stripped() -> None:
    body = '<a href="\n   /e/1  \t">1</a><a href="/e/\n2">2</a><a href="  ">self</a>'

    assert links(body) == ["https://events.example/e/1", "https://events.example/e/2"]


def test_unsafe_characters_are_percent_encoded_once() -> None:
    body = '<a href="/e/open air?name=Ä b">1</a><a href="/e/open%20air?name=%C3%84%20b">same</a>'

    assert links(body) == ["https://events.example/e/open%20air?name=%C3%84%20b"]


def test_links_in_malformed_html_are_found() -> None:
    body = '<table><tr><td><a href="/e/1">1<div><a href="/e/2">2</p></span><a href=/e/3>3'

    assert links(body) == ["https://events.example/e/1", "https://events.example/e/2", "https://events.example/e/3"]


def test_a_listing_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^'ftp://events\.example/' is not an absolute http\(s\) URL"):
        links("", url="ftp://events.example/")


def test_a_huge_listing_page() -> None:
    rows = "".join(
        f'<li class="event"><a href="/e/{n}?ref=list#top" title="{"t" * 200}">Event {n}</a>'
        f'<p>{"lorem ipsum " * 25}</p><a href="https://ads.example/{n}">ad</a></li>'
        for n in range(10_000)
    )
    html = f"<html><body><ul>{rows}</ul></body></html>"
    assert len(html) > 5_000_000

    found = find_links(html, LISTING, LinkDiscovery(pattern="/e/"))

    assert len(found) == 10_000
    assert (found[0], found[-1]) == ("https://events.example/e/0?ref=list", "https://events.example/e/9999?ref=list")


href_parts = st.sampled_from(
    ["https://", "http://", "//", "/", "../", "./", "\\", "?", "#", "@", ":", "%", " ", "\n", "[", "]", ":8080",
     "events.example", "EVENTS.example", "other.example", "www.events.example", "javascript:", "mailto:", "e", "1",
     "é", "\x00"],
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(st.lists(href_parts, max_size=8).map("".join), max_size=12), st.booleans())
def test_found_links_are_http_urls_on_the_listing_host_each_once(hrefs: list[str], same_site: bool) -> None:
    body = "".join(f"<a href='{href.replace(chr(39), '')}'>x</a>" for href in hrefs)

    found = links(body, LinkDiscovery(same_site=same_site))

    assert len(found) == len(set(found))
    for url in found:
        parts = urlsplit(url)
        assert parts.scheme in ("http", "https")
        assert parts.hostname
        assert not parts.fragment
        assert url != LISTING
        assert links(f'<a href="{url}">again</a>', LinkDiscovery(same_site=False)) == [url]  # already canonical
        if same_site:
            assert parts.hostname == "events.example"
