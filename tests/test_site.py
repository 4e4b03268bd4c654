"""The book's website (`python -m dlearn.site`): its citation links and widget stand-ins on small inputs, then the
built site in a real browser, headless Chromium, served from 127.0.0.1 with every other host blocked:
equations typeset, nothing requested from outside the site, search finds "Tweedie".

The browser tests need Debian's Chromium (`apt-get install chromium`); playwright drives it and never downloads
a browser. Without it they are skipped, except where DLEARN_REQUIRE_BROWSER=1 (CI), where they fail."""

import functools
import http.server
import json
import os
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest

from dlearn import site

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "build" / "site-screenshot.png"
# pages whose every request must stay on the site: the home page, two chapters, the reference pages, a search
SAMPLE = ["index.html", "notebooks/06_score.html", "notebooks/04_vdm.html", "bibliography.html",
          "figures/results.html", "search.html?q=Tweedie"]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# The pieces, without a browser
# ---------------------------------------------------------------------------------------------------------

ENTRIES = [
    {"key": "ho2020", "last": ["Ho", "Jain", "Abbeel"], "year": "2020", "abbr": None},
    {"key": "kw2014", "last": ["Kingma", "Welling"], "year": "2014", "abbr": None},
    {"key": "zra2023", "last": ["Zhang", "Rao", "Agrawala"], "year": "2023", "abbr": None},
    {"key": "ddim", "last": ["Song", "Meng", "Ermon"], "year": "2021", "abbr": "DDIM"},
    {"key": "sde", "last": ["Song", "Sohl-Dickstein", "Kingma", "Kumar", "Ermon", "Poole"], "year": "2021", "abbr": "SDE"},
]


def test_link_citations_keeps_the_words_and_links_each_citation():
    text = "As Ho et al. (2020) show (and Kingma & Welling 2014, App. B), Ho et al.'s (2020) loss; (Zhang, Rao &\nAgrawala 2023)."
    out, keys = site.link_citations(text, ENTRIES)
    assert keys == ["ho2020", "kw2014", "ho2020", "zra2023"]
    assert "{cite:author}`ho2020` ({cite:year}`ho2020`) show" in out
    assert "(and {cite:author}`kw2014` {cite:year}`kw2014`, App. B)" in out
    assert "{cite:author}`ho2020`'s ({cite:year}`ho2020`) loss" in out
    assert "({cite:author}`zra2023` {cite:year}`zra2023`)." in out
    # removing the roles gives back the words (a line break inside a name stays where it was)
    plain = re.sub(
        r"\{cite:(author|year)\}`(\w+)`",
        lambda m: {
            "ho2020": ("Ho et al.", "2020"),
            "kw2014": ("Kingma & Welling", "2014"),
            "zra2023": ("Zhang, Rao &\nAgrawala", "2023"),
        }[m[2]][m[1] == "year"],
        out,
    )
    assert plain == text


def test_link_citations_leaves_maths_code_headings_and_unknown_papers_alone():
    text = "# Ho et al. 2020\n`Ho et al. 2020` and $x = \\text{Ho et al. 2020}$; Smith et al. 2020; Ho et al. 2019."
    assert site.link_citations(text, ENTRIES) == (text, [])
    with pytest.raises(TypeError, match="markdown should be a str"):
        site.link_citations(None, ENTRIES)


def test_same_authors_and_year_are_told_apart_by_the_nearest_abbreviation():
    text = "DDIM (Song et al. 2021) is not the SDE paper.\n\nThe SDE of Song et al. (2021, Sec. 4)"
    out, keys = site.link_citations(text, ENTRIES)
    assert keys == ["ddim", "sde"]
    assert "{cite:author}`sde` ({cite:year}`sde`, Sec. 4)" in out


def test_every_citation_in_the_notebooks_links_to_the_bibliography():
    """A chapter that cites a paper missing from notebooks/references.bib fails here, naming it."""
    entries = site.read_bib(ROOT / site.BIB)
    citation = re.compile(r"\b[A-Z][\w-]+(?: et al\.|,? (?:&|and) [A-Z][\w-]+)(?:'s?)?,? \(?(?:19|20)\d\d\b")
    missing = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "markdown":
                linked, _ = site.link_citations("".join(cell["source"]), entries)
                plain = site._PROTECTED.sub("", linked)
                missing += [f"{path.stem}: {m.group(0)}" for m in citation.finditer(plain.replace("\n", " "))]
    assert not missing, f"citations with no entry in {site.BIB}: {missing}"


def test_widget_views_become_their_first_frame_and_a_note():
    image = {"output_type": "display_data", "data": {"image/png": "iVBOR", "text/plain": "<Figure>"}, "metadata": {}}
    state = {
        "box": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_slider", "IPY_MODEL_out"]}},
        "slider": {"model_name": "IntSliderModel", "state": {"value": 3}},
        "out": {"model_name": "OutputModel", "state": {"outputs": [image]}},
    }
    view = {"output_type": "display_data", "metadata": {},
            "data": {site.WIDGET_VIEW: {"model_id": "box"}, "text/plain": "VBox(...)"}}  # fmt: skip
    nb = {"metadata": {"widgets": {"application/vnd.jupyter.widget-state+json": {"state": state}}},
          "cells": [{"cell_type": "code", "source": "w", "outputs": [view]}]}  # fmt: skip
    out = site.static_widgets(nb)
    assert "widgets" not in out["metadata"] and "widgets" in nb["metadata"]  # the input is left as it was
    datas = [o["data"] for o in out["cells"][0]["outputs"]]
    assert datas[0] == image["data"] and "text/html" in datas[1]
    assert site.WIDGET_VIEW not in json.dumps(out)


def test_parts_follow_the_chapter_numbers():
    assert site.part_of("00_preface") == "Preface"
    assert site.part_of("02b_vae_study") == site.part_of("03_hvae") == site.PARTS[1][0]
    assert site.part_of("06_score").startswith("III.")
    assert site.part_of("99_new") == site.part_of("appendix") == site.OTHER_PART


# ---------------------------------------------------------------------------------------------------------
# The built site in a browser
# ---------------------------------------------------------------------------------------------------------


def _chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def chromium():
    path = _chromium()
    if path is None:
        if os.environ.get("DLEARN_REQUIRE_BROWSER") == "1":
            pytest.fail("Chromium is required for the site's browser test (DLEARN_REQUIRE_BROWSER=1): apt-get install chromium")
        pytest.skip("Chromium not installed: apt-get install chromium (CI installs it)")
    return path


@pytest.fixture(scope="module")
def served(chromium):
    """The site, built if missing or older than the notebooks, served on an ephemeral port of 127.0.0.1."""
    out = site.build(ROOT / "build" / "site", force=False)
    handler = functools.partial(_QuietHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, served):
    """A fresh page whose requests to any host but the site's are aborted and recorded in `page.outside`;
    the site's own failed responses (a file the build forgot) are recorded in `page.broken`."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    site_netloc = urlparse(served).netloc
    outside, broken = [], []

    def route(r):
        url = urlparse(r.request.url)
        if url.scheme in ("data", "blob") or url.netloc == site_netloc:
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    pg = context.new_page()
    pg.on("response", lambda resp: broken.append(f"{resp.status} {resp.url}") if resp.status >= 400 else None)
    pg.outside, pg.broken, pg.base = outside, broken, served
    yield pg
    context.close()


def _typeset(page) -> None:
    """Wait until MathJax has typeset the page."""
    page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=90_000)
    page.evaluate("() => MathJax.startup.promise")


def _prose(page) -> str:
    """The rendered text of the article without its code cells (code may hold a `$` legitimately)."""
    return page.evaluate(
        """() => { const a = document.querySelector('article').cloneNode(true);
                   a.querySelectorAll('.cell, mjx-container, pre').forEach(e => e.remove()); return a.innerText; }"""
    )


@pytest.mark.parametrize("chapter", ["06_score", "04_vdm"])
def test_equations_are_typeset(page, chapter):
    page.goto(f"{page.base}/notebooks/{chapter}.html")
    _typeset(page)
    assert page.locator("mjx-container").count() >= 20, "MathJax typeset too few equations"
    assert page.locator("mjx-merror").count() == 0, "MathJax reports a TeX error"
    text = _prose(page)
    for raw in ["$$", "\\(", "\\)", "\\[", "\\begin{"]:
        assert raw not in text, f"raw TeX {raw!r} left in the text of {chapter}"
    assert not re.search(r"\$[^$\n]*\\[a-zA-Z]+[^$\n]*\$", text), f"raw inline maths left in {chapter}"
    if chapter == "06_score":
        page.get_by_role("heading", name=re.compile(r"^1\. Tweedie")).first.scroll_into_view_if_needed()
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
    assert not page.outside and not page.broken


def test_no_page_requests_anything_outside_the_site(page):
    """... and every page typesets its maths, the sidebar's chapter titles included."""
    for path in SAMPLE:
        page.goto(f"{page.base}/{path}", wait_until="networkidle")
        _typeset(page)  # MathJax loads its fonts and extensions while it typesets
        page.wait_for_load_state("networkidle")
        if not path.startswith("search"):  # search summaries quote the text, not the typeset page
            text = page.evaluate("() => document.body.innerText")
            assert "\\(" not in text and "$$" not in text, f"raw TeX left on {path}"
    assert not page.outside, f"requests outside the site: {sorted(set(page.outside))}"
    assert not page.broken, f"files missing from the site: {sorted(set(page.broken))}"


def test_search_finds_tweedie(page):
    page.goto(f"{page.base}/search.html?q=Tweedie")
    page.wait_for_function("() => document.querySelectorAll('ul.search li a').length > 0", timeout=90_000)
    links = page.locator("ul.search li a").evaluate_all("as => as.map(a => a.getAttribute('href'))")
    assert any("06_score" in href for href in links), f"the score chapter is not among the results: {links}"
    assert not page.outside


def test_citations_link_to_their_entry_in_the_bibliography(page):
    page.goto(f"{page.base}/notebooks/06_score.html")
    link = page.locator("a[href*='bibliography.html#']", has_text="Efron").first
    href = link.get_attribute("href")
    page.goto(f"{page.base}/notebooks/{href}")
    entry = page.locator(f"[id='{href.split('#')[1]}']")
    assert re.search("Tweedie.s formula and selection bias", entry.inner_text())


@pytest.fixture(scope="module")
def built():
    """The site, built if missing or older than the notebooks (no browser needed)."""
    return site.build(ROOT / "build" / "site", force=False)


def test_no_built_page_loads_a_script_style_or_image_from_outside(built):
    """Every page, not only the sampled ones: no `src=` and no `<link href=>` that leaves the site (the browser test
    above sees requests; this sees every page's markup, without a browser)."""
    external = re.compile(r"""(?:\bsrc=|<link\b[^>]*\bhref=)["'](?:https?:)?//""", re.IGNORECASE)
    pages = sorted(built.rglob("*.html"))
    assert len(pages) > 15, f"expected the whole site under {built}, found {len(pages)} pages"
    offending = [f"{p.relative_to(built)}: {m.group(0)}" for p in pages for m in external.finditer(p.read_text(errors="replace"))]
    assert not offending, offending[:10]
