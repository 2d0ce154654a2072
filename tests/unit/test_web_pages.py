"""The web interface's pieces that need no browser (issue 14): the stylesheet's colour contrast
(WCAG 2 ratios computed from dlhub.css), the citation blocks, the plots' text alternatives, result
summaries, version mismatches and the endpoints history. The pages themselves: tests/web/."""

import json
import re
from pathlib import Path

import pytest

from dlhub.manager import web

CSS = (Path(web.__file__).parent / "static" / "dlhub.css").read_text()


def colours() -> dict[str, str]:
    root = re.search(r":root\s*\{([^}]*)\}", CSS).group(1)
    return dict(re.findall(r"--([\w-]+):\s*(#[0-9a-fA-F]{3,6})", root))


def luminance(hex_colour: str) -> float:
    h = hex_colour.lstrip("#")
    if len(h) == 3:
        h = "".join(c * 2 for c in h)
    channels = [int(h[i : i + 2], 16) / 255 for i in (0, 2, 4)]
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_contrast_ratio_matches_wcag_reference_values():
    assert contrast("#000", "#fff") == pytest.approx(21.0)
    assert contrast("#767676", "#fff") == pytest.approx(4.54, abs=0.01)  # the classic 4.5:1 grey
    assert contrast("#fff", "#fff") == pytest.approx(1.0)


# (text colour, background) pairs the stylesheet puts together, by variable name
TEXT_PAIRS = [
    ("fg", "bg"), ("fg", "card"), ("fg", "pre"), ("fg", "badge"), ("fg", "ok-bg"), ("fg", "bad-bg"),
    ("muted", "bg"), ("muted", "card"),
    ("accent", "bg"), ("accent", "card"), ("accent", "tag"), ("accent", "ok-bg"), ("accent", "bad-bg"),
    ("ok", "bg"), ("ok", "card"), ("ok", "ok-bg"),
    ("bad", "bg"), ("bad", "card"), ("bad", "bad-bg"),
    ("on-dark", "header"), ("on-dark", "accent"), ("on-dark", "bad"),
    ("plot2", "bg"),
]  # fmt: skip


@pytest.mark.parametrize(("fg", "bg"), TEXT_PAIRS)
def test_text_colours_have_at_least_4_5_to_1_contrast(fg, bg):
    c = colours()
    assert contrast(c[fg], c[bg]) >= 4.5, (fg, c[fg], bg, c[bg], round(contrast(c[fg], c[bg]), 2))


@pytest.mark.parametrize("bg", ["bg", "card", "header", "pre"])
def test_the_focus_ring_shows_on_every_background(bg):
    """WCAG 2.2 (focus appearance, non-text contrast): 3:1 against what it sits on; the ring has
    two colours, one of which must stand out on each background."""
    c = colours()
    assert max(contrast(c["focus"], c[bg]), contrast(c["focus-ring"], c[bg])) >= 3.0, bg
    assert re.search(r":focus-visible\s*\{[^}]*outline:\s*3px solid var\(--focus\)", CSS)
    assert "box-shadow: 0 0 0 6px var(--focus-ring)" in CSS


def test_form_borders_are_visible():
    c = colours()
    assert contrast(c["border"], c["bg"]) >= 3.0 and contrast(c["border"], c["card"]) >= 3.0


def test_no_literal_colours_outside_the_variables():
    """Every colour comes from :root (so the checks above cover them all)."""
    body = CSS[CSS.index("}", CSS.index(":root")) + 1 :]
    assert not re.findall(r"#[0-9a-fA-F]{3,6}\b", body)


RECORD = {
    "owner": "alice",
    "name": "band-gap",
    "version": 3,
    "title": "Band gaps & 100% of {things}",
    "authors": [{"name": "Doe, Alice", "affiliation": "ANL", "orcid": "0000-0002-1825-0097"}],
    "description": "Predicts band gaps.",
    "domains": ["materials science"],
    "keywords": ["dft"],
    "license": "MIT",
    "related_identifiers": [{"identifier": "10.1234/x_y", "type": "DOI", "relation": "IsDescribedBy"}],
}


def test_bibtex_escapes_latex_and_names_the_version():
    text = web.bibtex(RECORD, 2026, "http://hub/servables/alice/band-gap/3")
    assert text.startswith("@misc{alice_band_gap_v3,\n")
    assert r"title = {Band gaps \& 100\% of \{things\}}" in text
    assert "year = {2026}" in text and "doi = {10.1234/x_y}" in text  # the DOI as it is
    assert "url = {http://hub/servables/alice/band-gap/3}" in text and text.endswith("\n}")


def test_datacite_has_the_required_properties():
    doc = web.datacite(RECORD, 2026, "http://hub/x")
    json.dumps(doc)
    assert doc["titles"] == [{"title": RECORD["title"]}] and doc["publisher"] == "DLHub"
    assert doc["publicationYear"] == "2026" and doc["types"]["resourceTypeGeneral"] == "Software"
    creator = doc["creators"][0]
    assert creator["name"] == "Doe, Alice" and creator["affiliation"] == ["ANL"]
    assert creator["nameIdentifiers"][0]["nameIdentifierScheme"] == "ORCID"
    assert doc["relatedIdentifiers"][0] == {
        "relatedIdentifier": "10.1234/x_y",
        "relatedIdentifierType": "DOI",
        "relationType": "IsDescribedBy",
    }


def test_plots_carry_their_numbers_as_text():
    bars = web.svg_bars([("p50 ms", 1.5), ("p99 ms", 9.0)], unit="")
    assert 'role="img"' in bars and 'aria-label="p50 ms: 1.5, p99 ms: 9"' in bars
    assert web.svg_bars([]) == ""
    lines = web.svg_lines({"queue depth": [(100.0, 0), (130.0, 4), (160.0, 2)]}, now=160.0)
    assert "queue depth: now 2, max 4 over the last 60 s" in lines and lines.count("<polyline") == 1
    assert web.svg_lines({"a": [], "b": []}, now=1.0) == ""


def test_latency_histogram_by_decade():
    assert web.latency_histogram([]) == []
    assert web.latency_histogram([0.5, 0.7, 3.0]) == [("<1 ms", 2), ("1-10 ms", 1), ("10-100 ms", 0)]
    assert web.latency_histogram([20.0, 20_000.0]) == [
        ("10-100 ms", 1),
        ("0.1-1 s", 0),
        ("1-10 s", 0),
        (">10 s", 1),
    ]


def test_large_results_are_summarized():
    assert web.summarize([1, 2, 3]) == [1, 2, 3]
    big = web.summarize([[0.0] * 3] * 100)
    assert big["shape"] == [100, 3] and len(big["first"]) == 5
    assert web.summarize({"a": list(range(50))})["a"]["shape"] == [50]


def test_version_mismatches():
    manager = {"python": "3.11.7", "dill": "0.3.9"}
    assert web.version_mismatches(manager, {"python": "3.11.7", "dill": "0.3.9"}) == []
    assert web.version_mismatches(manager, {"python": "3.12.1"}) == [
        "python: endpoint 3.12.1, manager 3.11.7"
    ]


def test_history_throughput_and_queue_depth():
    h = web.History()

    def status(finished: int, pending: int) -> dict:
        return {"finished": finished, "endpoints": {"e": {"pending": pending, "inflight": 1}}}

    h.add(status(0, 5), now=1000.0)
    h.add(status(0, 6), now=1000.5)  # within a second: replaces the last sample
    h.add(status(20, 2), now=1010.0)
    series = h.series()
    assert series["queue depth"] == [(1000.5, 7), (1010.0, 3)]
    assert series["throughput (tasks/s)"] == [(1010.0, round(20 / 9.5, 2))]
    h.add(status(20, 0), now=1000.0 + web.History.KEEP_S + 5)  # the oldest fall out
    assert [t for t, _ in h.series()["queue depth"]][0] == 1010.0


def test_queue_depth_counts_tasks_held_for_fair_share():
    h = web.History()
    h.add({"finished": 0, "endpoints": {"e": {"pending": 1, "held": 40, "inflight": 8}}}, now=1000.0)
    assert h.series()["queue depth"] == [(1000.0, 49)]
