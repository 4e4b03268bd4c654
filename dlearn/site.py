"""The book as an offline website: Sphinx, myst-nb and sphinx-book-theme over the executed notebooks.

    python -m dlearn.site                    # build/site/index.html (about 10 s on one thread)
    python -m dlearn.site --out DIR          # somewhere else

Nothing is re-executed: the pages show the outputs saved in `notebooks/*.ipynb` by `python -m dlearn.book`
(myst-nb's `nb_execution_mode = "off"`). The site works with no network: MathJax 3 is served from the site
itself (the copy that the `sphinx-mathjax-offline` package ships), each interactive widget is replaced by
its first frame (the image its Output widget held when the notebook ran; run the notebook in Jupyter to
move the sliders), and the theme loads no fonts, analytics or scripts from elsewhere.

The Sphinx source is generated under `build/site-src/` (the repository keeps no docs folder): `conf.py`,
an index by part and chapter, copies of the notebooks in which each "Author et al. YEAR" of the text that
names an entry of `notebooks/references.bib` becomes a link to the bibliography page, the results page
(`figures/results.md`), the index of checked claims (`figures/claims.md`) and the bibliography
(sphinxcontrib-bibtex). The notebooks themselves stay plain markdown, readable in Jupyter. Sphinx keeps its
doctrees in `build/site-doctrees/` and myst-nb the notebooks' images in `build/jupyter_execute/` (beside the
output folder), so a second build redoes only the pages whose notebook changed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dlearn import fileio

ROOT = Path(__file__).resolve().parent.parent
BIB = "notebooks/references.bib"
PAGES = ["figures/results.md", "figures/claims.md"]
# the parts of the book (as in chapter 00's table): title and the chapter numbers in it; a study notebook
# ("02b_...") belongs to its chapter's part, and a notebook in no part lands in the last group
PARTS = [
    ("Preface", (0,)),
    ("I. Latent-variable models and their bound", (1, 2, 3)),
    ("II. Diffusion as a very deep hierarchical VAE", (4, 5)),
    ("III. The score view", (6,)),
    ("IV. Controlling and adapting a text-to-image model", (7, 8, 9, 10)),
    ("V. A real Stable Diffusion pipeline", (11,)),
]
OTHER_PART = "Other notebooks"
# the parts of MathJax 3 a page needs: the TeX-to-CommonHTML bundle, the TeX extensions it loads on demand,
# its fonts, the menu and the accessibility module the menu switches on
MATHJAX_KEEP = ["tex-chtml.js", "input/tex/extensions", "output/chtml/fonts/woff-v2", "ui", "a11y"]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = (
    '<p class="dlearn-widget-note"><em>Interactive in Jupyter: run the notebook to move the controls. '
    "Shown here: the figure as the notebook left it.</em></p>"
)


# ---------------------------------------------------------------------------------------------------------
# Citations: "Ho et al. (2020)" -> {cite:author}`ho2020denoising` ({cite:year}`ho2020denoising`)
# ---------------------------------------------------------------------------------------------------------


def read_bib(path: Path) -> list[dict]:
    """The entries of a BibTeX file: key, the authors' last names, year and the optional `abbr` field."""
    from pybtex.database import parse_file

    entries = []
    for key, entry in parse_file(str(path), bib_format="bibtex").entries.items():
        people = entry.persons.get("author", [])
        if not people or "year" not in entry.fields:
            raise ValueError(f"{path}: entry {key!r} needs an author and a year")
        last = [" ".join(p.last_names).replace("{", "").replace("}", "") for p in people]
        entries.append({"key": key, "last": last, "year": entry.fields["year"], "abbr": entry.fields.get("abbr")})
    return entries


def author_forms(last: list[str]) -> list[str]:
    """How the text writes a paper's authors: "Luo", "Ho & Salimans", "Ho et al.", "Zhang, Rao & Agrawala"."""
    if len(last) == 1:
        return [last[0]]
    if len(last) == 2:
        return [f"{last[0]} & {last[1]}", f"{last[0]} and {last[1]}"]
    forms = [f"{last[0]} et al."]
    if len(last) == 3:
        forms += [f"{last[0]}, {last[1]} & {last[2]}", f"{last[0]}, {last[1]} and {last[2]}"]
    return forms


def citation_pattern(entries: list[dict]) -> re.Pattern:
    """One regex for every (authors, year) the bibliography knows: the authors, an optional possessive, a
    space, comma or opening parenthesis, the year ("Kingma et al.'s (2021)", "Burda et al. 2016")."""
    forms = sorted({f for e in entries for f in author_forms(e["last"])}, key=len, reverse=True)
    years = sorted({e["year"] for e in entries})
    names = "|".join(r"\s+".join(map(re.escape, f.split(" "))) for f in forms)  # a line may break inside
    return re.compile(rf"(?<![\w{{`])(?P<name>{names})(?P<mid>'s?)?(?P<sep>,?\s\(|,?\s)(?P<year>{'|'.join(years)})(?![\w`])")


def _choose(candidates: list[dict], text: str, at: int) -> dict:
    """Among entries with the same authors and year, the one whose `abbr` stands nearest to position `at`."""
    if len(candidates) == 1:
        return candidates[0]
    best, best_distance = candidates[0], None
    for entry in candidates:
        for m in re.finditer(re.escape(entry["abbr"] or "\x00"), text):
            distance = abs(m.start() - at)
            if best_distance is None or distance < best_distance:
                best, best_distance = entry, distance
    return best


# code spans and maths are left alone: a citation is only ever plain text
_PROTECTED = re.compile(r"(`+)[^`]*?\1|\$\$.*?\$\$|\$[^$\n]+\$|\\\[.*?\\\]", re.S)


def link_citations(markdown: str, entries: list[dict]) -> tuple[str, list[str]]:
    """Turn each author-year citation of `markdown` that names a bibliography entry into MyST roles that link
    to it, keeping the words around it; headings are left as they are. Returns the text and the keys cited."""
    if not isinstance(markdown, str):
        raise TypeError(f"markdown should be a str, got {type(markdown).__name__}")
    pattern = citation_pattern(entries)
    by_name = {}
    for e in entries:
        for form in author_forms(e["last"]):
            by_name.setdefault((form, e["year"]), []).append(e)
    cited = []

    protected = [(b.start(), b.end()) for b in _PROTECTED.finditer(markdown)]
    protected += [(h.start(), h.end()) for h in re.finditer(r"^[ \t]*#.*$", markdown, re.M)]  # headings

    def replace(m: re.Match) -> str:
        if any(start <= m.start() < end for start, end in protected):
            return m.group(0)
        entry = _choose(by_name[(" ".join(m["name"].split()), m["year"])], markdown, m.start())
        cited.append(entry["key"])
        k = entry["key"]
        return f"{{cite:author}}`{k}`{m['mid'] or ''}{m['sep']}{{cite:year}}`{k}`"

    return pattern.sub(replace, markdown), cited


# ---------------------------------------------------------------------------------------------------------
# Widgets: each widget view becomes the outputs its Output widget held (the figure it drew first)
# ---------------------------------------------------------------------------------------------------------


def widget_outputs(state: dict, model_id: str, seen: set | None = None) -> list[dict]:
    """The outputs held by the Output widgets inside widget `model_id` (children followed through the saved
    widget state: every "IPY_MODEL_<id>" reference)."""
    seen = set() if seen is None else seen
    if model_id in seen or model_id not in state:
        return []
    seen.add(model_id)
    model = state[model_id]
    found = list(model["state"].get("outputs", [])) if model.get("model_name") == "OutputModel" else []
    for ref in re.findall(r"IPY_MODEL_(\w+)", json.dumps(model["state"])):
        found += widget_outputs(state, ref, seen)
    return found


def static_widgets(nb: dict) -> dict:
    """A copy of notebook `nb` without widgets: each widget view replaced by its Output widgets' outputs and a
    note, and the saved widget state removed (it would make the page load the widget scripts from a CDN)."""
    nb = json.loads(json.dumps(nb))
    state = nb.get("metadata", {}).pop("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    state = state.get("state", {})
    note = {"output_type": "display_data", "metadata": {}, "data": {"text/html": WIDGET_NOTE, "text/plain": ""}}
    for cell in nb["cells"]:
        outputs = []
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW)
            if view is None:
                outputs.append(output)
                continue
            frames = [o for o in widget_outputs(state, view["model_id"]) if o.get("output_type") != "stream"]
            outputs += [{"output_type": "display_data", "metadata": o.get("metadata", {}), "data": o["data"]}
                        for o in frames if "data" in o] + [note]  # fmt: skip
        if "outputs" in cell:
            cell["outputs"] = outputs
    return nb


# ---------------------------------------------------------------------------------------------------------
# The Sphinx source tree and the build
# ---------------------------------------------------------------------------------------------------------


def part_of(stem: str) -> str:
    """The part a notebook belongs to, from its chapter number ("06_score" -> "III. The score view")."""
    m = re.match(r"(\d+)", stem)
    for title, chapters in PARTS:
        if m and int(m.group(1)) in chapters:
            return title
    return OTHER_PART


def conf_py(title: str) -> str:
    """The text of the generated `conf.py`."""
    return f"""# Generated by `python -m dlearn.site`: edit dlearn/site.py, not this file.
project = {title!r}
author = "the dlearn authors"
extensions = ["myst_nb", "sphinxcontrib.bibtex"]
exclude_patterns = ["_build"]

# the notebooks as saved: nothing runs
nb_execution_mode = "off"
nb_ipywidgets_js = {{}}
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_dmath_double_inline = True  # "$$...$$" inside a paragraph is display maths, as in Jupyter

# MathJax 3 served from the site itself
mathjax_path = "mathjax/tex-chtml.js"
mathjax3_config = {{"options": {{}}}}

bibtex_bibfiles = ["references.bib"]
bibtex_reference_style = "author_year"
bibtex_default_style = "plain"

html_theme = "sphinx_book_theme"
html_title = {title!r}
html_static_path = ["_static"]
html_copy_source = False
html_show_sourcelink = False
html_theme_options = {{
    "use_download_button": False,
    "use_repository_button": False,
    "use_fullscreen_button": False,
    "launch_buttons": {{}},
    "show_toc_level": 2,
    "navigation_with_keys": False,
}}


def setup(app):
    app.set_html_assets_policy("always")  # MathJax on every page: the sidebar's chapter titles hold maths
"""


def index_md(stems: list[str]) -> str:
    """The home page: what the site is, then the chapters by part (each part a toctree for the sidebar)."""
    lines = [
        "# dlearn: diffusion models, from the ELBO to Null-text inversion",
        "",
        "A runnable textbook: each chapter is a notebook whose every claim is checked by a computation in it.",
        "These pages show the notebooks as they last ran (`python -m dlearn.book`); to run them, open",
        "`notebooks/` in Jupyter. The [results](figures/results.md) page collects each chapter's headline",
        "numbers, the [index of checked claims](figures/claims.md) lists every check, and the",
        "[bibliography](bibliography.md) the papers the chapters cite.",
        "",
    ]
    groups = {}
    for stem in stems:
        groups.setdefault(part_of(stem), []).append(stem)
    for title in [p for p, _ in PARTS] + [OTHER_PART]:
        if title in groups:
            entries = "\n".join(f"notebooks/{s}" for s in groups[title])
            lines += [f"```{{toctree}}\n:caption: {title}\n:maxdepth: 1\n\n{entries}\n```", ""]
    lines += ["```{toctree}\n:caption: Reference\n:maxdepth: 1\n\nfigures/results\nfigures/claims\nbibliography\n```", ""]
    return "\n".join(lines)


BIBLIOGRAPHY_MD = """# Bibliography

The papers the chapters cite. A citation in a chapter links here.

```{bibliography}
:all:
```
"""


def _write_if_changed(path: Path, text: str) -> None:
    """Write `text` unless the file already holds it (so that Sphinx rebuilds only the pages that changed)."""
    _write_bytes_if_changed(path, text.encode("utf-8"))


def _write_bytes_if_changed(path: Path, data: bytes) -> None:
    if not path.exists() or path.read_bytes() != data:
        fileio.write_bytes(path, data)


def copy_mathjax(dest: Path) -> None:
    """Copy the parts of MathJax 3 that a page uses (`MATHJAX_KEEP`) from the sphinx-mathjax-offline package."""
    found = [base / "sphinx-mathjax-offline" / "static" / "mathjax" for base in map(Path, sys.path)]
    found = [path for path in found if (path / "tex-chtml.js").is_file()]
    if not found:
        raise RuntimeError("MathJax not found: pip install sphinx-mathjax-offline (in the dev extra: pip install -e '.[dev]')")
    source = found[0]
    for part in MATHJAX_KEEP:
        if (dest / part).exists():
            continue
        (dest / part).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (source / part).is_dir() else shutil.copy2)(source / part, dest / part)


def write_source(root: Path, src: Path) -> list[str]:
    """Write the Sphinx source tree for the book in `root` into `src`; returns the notebook stems, in order."""
    root, src = Path(root), Path(src)
    notebooks = sorted((root / "notebooks").glob("*.ipynb"))
    if not notebooks:
        raise ValueError(f"no notebooks in {root / 'notebooks'}: expected the book's executed *.ipynb files")
    entries = read_bib(root / BIB)
    for path in notebooks:
        nb = static_widgets(json.loads(path.read_text(encoding="utf-8")))
        for cell in nb["cells"]:
            if cell["cell_type"] == "markdown":
                source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
                cell["source"] = link_citations(source, entries)[0]
        _write_if_changed(src / "notebooks" / path.name, json.dumps(nb, indent=1, ensure_ascii=False))
    for page in PAGES:
        if (root / page).exists():
            _write_if_changed(src / page, (root / page).read_text(encoding="utf-8"))
    linked = "".join((root / p).read_text(encoding="utf-8") for p in PAGES if (root / p).exists())
    for figure in sorted((root / "figures").glob("*.png")):
        if f"]({figure.name})" in linked:  # the figures the results page links to
            _write_bytes_if_changed(src / "figures" / figure.name, figure.read_bytes())
    stems = [p.stem for p in notebooks]
    _write_if_changed(src / "references.bib", (root / BIB).read_text(encoding="utf-8"))
    _write_if_changed(src / "bibliography.md", BIBLIOGRAPHY_MD)
    _write_if_changed(src / "index.md", index_md(stems))
    _write_if_changed(src / "conf.py", conf_py("dlearn"))
    copy_mathjax(src / "_static" / "mathjax")
    return stems


def inputs(root: Path) -> list[Path]:
    """The files the site is built from: a newer one makes the built site stale."""
    root = Path(root)
    return [*sorted((root / "notebooks").glob("*.ipynb")), root / BIB, *(root / p for p in PAGES), Path(__file__)]


def is_stale(out: Path, root: Path = ROOT) -> bool:
    """Whether the site in `out` is missing or older than any file it is built from."""
    index = Path(out) / "index.html"
    if not index.exists():
        return True
    built = index.stat().st_mtime
    return any(p.exists() and p.stat().st_mtime > built for p in inputs(root))


def build(out: str | Path = "build/site", root: str | Path = ROOT, force: bool = True, quiet: bool = True) -> Path:
    """Build the site from the notebooks in `root` into `out` (relative paths are taken from `root`).

    With `force=False` it builds only when the site is stale (`is_stale`). A lock on `out` makes concurrent
    callers (pytest workers) wait for one build instead of writing the same files at once. Returns `out`."""
    root = Path(root)
    out = Path(out) if Path(out).is_absolute() else root / out
    with fileio.locked(out):
        if force or is_stale(out, root):
            src, doctrees = root / "build" / "site-src", root / "build" / "site-doctrees"
            write_source(root, src)
            command = [sys.executable, "-m", "sphinx", "-b", "html", "-j", "1", "-d", str(doctrees), str(src), str(out)]
            subprocess.run(command + (["-q"] if quiet else []), check=True)
            (out / "index.html").touch()  # the build's time, even where Sphinx left an unchanged page alone
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlearn.site", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="build/site", help="the folder for the HTML (default build/site)")
    parser.add_argument("--verbose", action="store_true", help="show Sphinx's progress, not only its warnings")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = build(Path(args.out).resolve(), quiet=not args.verbose)
    print(f"site: {out / 'index.html'} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
