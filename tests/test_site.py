"""The book's website in a real browser: every page loads, works offline and links correctly.

Builds nothing: it checks ``_build/html`` as ``scripts/fetch_static.sh`` followed by
``jupyter-book build .`` left it. The folder is served on 127.0.0.1 (a free port, Python's
``http.server`` in a thread) and every page is opened in headless Chromium through Selenium.
For each page we check that

- it loads (HTTP 200, a title) and no file it asks for is missing (every response < 400);
- every request stays on 127.0.0.1 (Chrome's network log and the page's resource timings),
  and no ``<script src>``, ``<link href>``, ``<img src>`` in the HTML names another host;
- maths is typeset by the site's own MathJax: every ``.math`` element holds an
  ``mjx-container``, there is no MathJax error and no ``$$``, ``\\(`` or ``\\[`` left in the text;
- every Mermaid diagram is drawn as an SVG with nodes in it, not an error diagram;
- every ``<img>`` loaded (``naturalWidth > 0``);
- no JavaScript error was thrown;
- every link to a page of the site points to a file that exists, and its ``#anchor`` to an id
  in that file;
- no page shows raw Markdown table syntax (a ``| --- |`` rule in the prose, the mark of a table
  that went through a CommonMark renderer) or a stray repr in a cell's output, such as
  ``(None, None)`` or ``<Figure size 640x480 with 1 Axes>`` (``rendering_problems``, which reads
  the HTML on disk and is unit-tested below on HTML strings).

Pages opened from ``file://`` (a reader double-clicking ``index.html``) must work too: the
front page's maths and the diagrams are checked that way as well. A screenshot of the front
page goes to ``_build/screenshots/front.png`` (kept by CI).

Skips when the site, selenium, /usr/bin/chromium or /usr/bin/chromedriver is missing, unless
``VITSSL_SITE_TEST=1`` (CI sets it after building the site): then a missing piece fails.
"""

from __future__ import annotations

import functools
import html
import http.server
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
STRICT = os.environ.get("VITSSL_SITE_TEST") == "1"

CHROME_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1000",
]
PAGE_TIMEOUT_S = 30  # loading one page
WAIT_S = 15  # then waiting in the page for MathJax, Mermaid and images (a broken
# page waits this long before it is reported)
# Console errors that are not ours to fix and break nothing. The pydata theme logs this with
# console.error on a first visit, when the reader's light/dark choice is not stored yet.
CONSOLE_ALLOWED = ("Got invalid theme mode",)
# The site has no favicon; browsers ask for /favicon.ico on their own and get a 404.
BROWSER_OWN = ("/favicon.ico",)
# Schemes that reach a network; anything else (chrome:, data:, blob:, about:) stays in the browser.
NETWORK_SCHEMES = ("http", "https", "ws", "wss", "ftp")


def _missing_prerequisite() -> str | None:
    if not (SITE / "index.html").is_file():
        return f"{SITE / 'index.html'} not found: run scripts/fetch_static.sh and jupyter-book build ."
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for exe, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not exe.is_file():
            return f"{exe} not found (apt-get install {package})"
    return None


def _require_prerequisites() -> None:
    reason = _missing_prerequisite()
    if reason is None:
        return
    if STRICT:
        pytest.fail(f"VITSSL_SITE_TEST=1 but {reason}", pytrace=False)
    pytest.skip(reason)


# ------------------------------------------------------------------------------------------
# The site on disk


def site_pages(site: Path = SITE) -> list[str]:
    """Every HTML page of the built site, as paths relative to ``site`` (posix)."""
    skip_dirs = {"_static", "_sources", "_images"}
    pages = []
    for path in sorted(site.rglob("*.html")):
        rel = path.relative_to(site)
        if skip_dirs.intersection(rel.parts[:-1]):
            continue
        pages.append(rel.as_posix())
    return pages


class _AssetParser(HTMLParser):
    """Collects the URLs a page makes the browser load, and the ids it defines."""

    LOADS = {
        ("script", "src"),
        ("link", "href"),
        ("img", "src"),
        ("iframe", "src"),
        ("source", "src"),
        ("video", "src"),
        ("audio", "src"),
        ("embed", "src"),
        ("object", "data"),
    }

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.loads: list[tuple[str, str]] = []  # (tag, url)
        self.ids: set[str] = set()
        self.refresh: str | None = None  # <meta http-equiv="refresh"> target

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        for key in ("id", "name") if tag == "a" else ("id",):
            if a.get(key):
                self.ids.add(a[key])
        for t, attr in self.LOADS:
            if tag == t and a.get(attr):
                self.loads.append((tag, a[attr]))
        if tag == "meta" and a.get("http-equiv", "").lower() == "refresh":
            m = re.search(r"url=(.+)$", a.get("content", ""), re.I)
            if m:
                self.refresh = m.group(1).strip().strip("'\"")


@functools.lru_cache(maxsize=None)
def _parse(path: Path) -> _AssetParser:
    parser = _AssetParser()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return parser


def _is_external(url: str) -> bool:
    """True for a URL that names a host (http(s)://host/..., //host/...)."""
    return bool(urlsplit(url).netloc)


# ------------------------------------------------------------------------------------------
# What a page shows: raw Markdown tables and stray reprs

# A table rule such as "| --- | ---: |" or "|:---|---|": at least two cells of three dashes.
_RAW_TABLE = re.compile(r"\|\s*:?-{3,}:?\s*\|(?:\s*:?-{3,}:?\s*\|?)*")
# A whole output block that is only the repr of what a cell's last line returned.
_STRAY_REPR = re.compile(
    r"\((?:None,\s*)*None,?\)"  # (None, None), (None,)
    r"|\[(?:None,\s*)*None\]"  # [None, None]
    r"|None"
    r"|\[?<(?:Figure|Axes|matplotlib\.)[^>]*>(?:,\s*<[^>]*>)*\]?"  # <Figure size 640x480 with 1 Axes>,
    #                                                          [<matplotlib.lines.Line2D at 0x7f...>]
    r"|(?:Text|Line2D)\(.*\)"  # Text(0.5, 1.0, 'title')
)
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}


class _TextParser(HTMLParser):
    """The prose a reader sees (outside code, scripts and maths) and every cell output's text."""

    HIDDEN = {"pre", "code", "script", "style", "textarea", "mjx-container"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, hides text, is a cell output)
        self.prose: list[str] = []
        self.outputs: list[list[str]] = []  # one list of text pieces per output block

    def _hidden(self) -> bool:
        return any(h for _, h, _ in self.stack)

    def _in_output(self) -> bool:
        return any(o for _, _, o in self.stack)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID:
            return
        classes = (dict(attrs).get("class") or "").split()
        hides = tag in self.HIDDEN or "math" in classes
        is_output = "cell_output" in classes
        if is_output and not self._in_output():
            self.outputs.append([])
        self.stack.append((tag, hides, is_output))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, -1, -1):  # tolerate unclosed inner tags
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data: str) -> None:
        if self._in_output():
            self.outputs[-1].append(data)
        if not self._hidden():
            self.prose.append(data)


def rendering_problems(page_html: str) -> list[str]:
    """What a reader should not see on a page: raw Markdown tables in the prose, stray reprs.

    ``page_html`` is one page's HTML. A raw table is a ``| --- |`` rule outside code, maths and
    scripts. A stray repr is an output block (a ``cell_output`` element) that holds one line such
    as ``(None, None)`` or ``<Figure size 640x480 with 1 Axes>``.
    """
    if not isinstance(page_html, str):
        raise TypeError(f"page_html must be a str, got {type(page_html).__name__}")
    parser = _TextParser()
    parser.feed(page_html)
    parser.close()
    problems = []
    prose = "".join(parser.prose)
    for m in _RAW_TABLE.finditer(prose):
        problems.append(f"raw Markdown table: {prose[max(0, m.start() - 40) : m.end() + 20]!r}")
    for pieces in parser.outputs:
        for line in "".join(pieces).splitlines():
            if _STRAY_REPR.fullmatch(line.strip()):
                problems.append(f"stray repr in an output: {line.strip()!r}")
    return problems


# ------------------------------------------------------------------------------------------
# Serving and browsing


class _Handler(http.server.SimpleHTTPRequestHandler):
    # Explicit types: Python 3.11 does not know .mjs, and browsers refuse a module served as
    # application/octet-stream.
    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
        ".mjs": "text/javascript",
        ".css": "text/css",
        ".svg": "image/svg+xml",
        ".woff2": "font/woff2",
        ".woff": "font/woff",
        ".json": "application/json",
    }

    def log_message(self, format: str, *args) -> None:  # keep pytest's output clean
        pass


@pytest.fixture(scope="module")
def server():
    """The built site on http://127.0.0.1:<free port>/."""
    _require_prerequisites()
    handler = functools.partial(_Handler, directory=str(SITE))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium with a fresh profile, logging the network and the console."""
    _require_prerequisites()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="vitssl-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    driver.set_script_timeout(WAIT_S + 30)
    driver.get("about:blank")
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# Runs in the page (execute_async_script): waits for MathJax and Mermaid, makes lazy images
# load, then reports what the checks need. The last argument is selenium's callback.
_INSPECT_JS = r"""
const done = arguments[arguments.length - 1];
const deadline = Date.now() + arguments[0];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
(async () => {
  const report = {};
  try {
    // MathJax: the page asked for it if it has .math elements; wait for the first typeset.
    const mathNodes = [...document.querySelectorAll(".math")];
    if (mathNodes.length) {
      while (!(window.MathJax && MathJax.startup && MathJax.startup.promise) && Date.now() < deadline) await sleep(50);
      if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
        await Promise.race([MathJax.startup.promise, sleep(Math.max(0, deadline - Date.now()))]);
      }
    }
    // Mermaid: every diagram is drawn once it holds an <svg> (or Mermaid marked it processed).
    const diagrams = () => [...document.querySelectorAll("pre.mermaid, div.mermaid")];
    while (diagrams().some((d) => !d.querySelector("svg")) && Date.now() < deadline) await sleep(100);
    // Images: load lazy ones too, then wait for all to settle.
    const imgs = [...document.images];
    imgs.forEach((img) => { img.loading = "eager"; });
    while (imgs.some((img) => !img.complete) && Date.now() < deadline) await sleep(50);

    const hidden = new Set(["PRE", "CODE", "SCRIPT", "STYLE", "MJX-CONTAINER", "TEXTAREA"]);
    const texts = [];
    const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {
      acceptNode(node) {
        for (let el = node.parentElement; el; el = el.parentElement) {
          if (hidden.has(el.tagName.toUpperCase())) return NodeFilter.FILTER_REJECT;
        }
        return NodeFilter.FILTER_ACCEPT;
      },
    });
    while (walker.nextNode()) texts.push(walker.currentNode.nodeValue);

    report.title = document.title;
    report.url = location.href;
    report.math = mathNodes.length;
    report.mathUntypeset = mathNodes.filter((m) => !m.querySelector("mjx-container")).map((m) => m.textContent.slice(0, 80));
    report.mjx = document.querySelectorAll("mjx-container").length;
    report.mathErrors = [...document.querySelectorAll("mjx-merror")].map((e) => e.textContent.slice(0, 80));
    report.rawTex = [...new Set(texts.join(" ").match(/\$\$|\\\(|\\\[|\\begin\{/g) || [])];
    report.diagrams = diagrams().map((d) => {
      const svg = d.querySelector("svg");
      const box = svg ? svg.getBoundingClientRect() : { width: 0, height: 0 };
      return {
        svg: !!svg,
        nodes: svg ? svg.querySelectorAll(".node").length : 0,
        width: box.width, height: box.height,
        error: svg ? /Syntax error|Parse error/i.test(svg.textContent) || !!svg.querySelector(".error-icon") : false,
      };
    });
    report.images = imgs.map((img) => ({ src: img.currentSrc || img.src, ok: img.complete && img.naturalWidth > 0 }));
    report.links = [...document.querySelectorAll("a[href]")].map((a) => a.href);
    report.resources = performance.getEntriesByType("resource").map((r) => ({ name: r.name, status: r.responseStatus }));
    const nav = performance.getEntriesByType("navigation")[0];
    report.status = nav ? nav.responseStatus : null;
  } catch (err) {
    report.error = String(err && err.stack || err);
  }
  done(report);
})();
"""


@dataclass
class PageReport:
    page: str
    info: dict
    requests: list[str] = field(default_factory=list)  # every URL the page requested
    responses: list[tuple[str, int]] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)


def _drain_logs(driver) -> tuple[list[str], list[tuple[str, int]], list[str]]:
    """Requests and responses from Chrome's network log, and the console's errors."""
    requests, responses = [], []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            requests.append(msg["params"]["request"]["url"])
        elif msg.get("method") == "Network.responseReceived":
            resp = msg["params"]["response"]
            responses.append((resp["url"], int(resp["status"])))
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return requests, responses, errors


def _visit(driver, url: str) -> tuple[dict, list[str], list[tuple[str, int]], list[str]]:
    _drain_logs(driver)  # forget the previous page
    driver.get(url)
    info = driver.execute_async_script(_INSPECT_JS, WAIT_S * 1000)
    time.sleep(0.1)  # let the last log entries arrive
    return (info, *_drain_logs(driver))


@pytest.fixture(scope="module")
def reports(server, browser) -> dict[str, PageReport]:
    """Every page of the site, visited once over HTTP."""
    out = {}
    for page in site_pages():
        if _parse(SITE / page).refresh is not None:
            continue  # a redirect stub (index.html); its target is a page of its own
        info, requests, responses, errors = _visit(browser, server + page)
        out[page] = PageReport(page, info, requests, responses, errors)
    return out


def _fail_if(problems: list[str], what: str) -> None:
    if problems:
        pytest.fail(f"{what}:\n  " + "\n  ".join(problems), pytrace=False)


# ------------------------------------------------------------------------------------------
# The tests


def test_site_has_pages_math_and_diagrams(reports):
    """The checks below look at something: the book's pages, with maths and diagrams."""
    pages = set(reports)
    assert {"book/intro.html", "book/flowchart.html", "book/glossary.html"} <= pages, sorted(pages)
    assert sum(r.info.get("math", 0) for r in reports.values()) > 0, "no page has maths"
    assert sum(len(r.info.get("diagrams", [])) for r in reports.values()) >= 4, "diagrams missing"


def test_redirect_stubs_point_to_pages():
    _require_prerequisites()
    problems = []
    for page in site_pages():
        target = _parse(SITE / page).refresh
        if target is not None and not (SITE / page).parent.joinpath(unquote(urlsplit(target).path)).is_file():
            problems.append(f"{page} redirects to missing {target}")
    _fail_if(problems, "broken redirects")


def test_pages_load(reports):
    problems = []
    for page, r in reports.items():
        if "error" in r.info:
            problems.append(f"{page}: inspection failed: {r.info['error']}")
            continue
        if r.info.get("status") not in (200, None):
            problems.append(f"{page}: HTTP {r.info['status']}")
        if not r.info.get("title", "").strip():
            problems.append(f"{page}: no <title>")
        for url, status in r.responses:
            if status >= 400 and not urlsplit(url).path.endswith(BROWSER_OWN):
                problems.append(f"{page}: {url} -> HTTP {status}")
        for res in r.info.get("resources", []):
            if res.get("status") and res["status"] >= 400 and not urlsplit(res["name"]).path.endswith(BROWSER_OWN):
                problems.append(f"{page}: {res['name']} -> HTTP {res['status']}")
    _fail_if(problems, "pages or their files did not load")


def test_no_request_leaves_the_site(reports, server):
    host = urlsplit(server).netloc
    problems = []
    for page, r in reports.items():
        urls = set(r.requests) | {res["name"] for res in r.info.get("resources", [])}
        for url in sorted(urls):
            parts = urlsplit(url)
            if parts.scheme in NETWORK_SCHEMES and parts.netloc != host:
                problems.append(f"{page}: requested {url}")
    _fail_if(problems, "requests to another host")


def test_html_loads_nothing_from_another_host():
    """Static check of every HTML file, pages and redirect stubs alike."""
    _require_prerequisites()
    problems = []
    for page in site_pages():
        for tag, url in _parse(SITE / page).loads:
            if _is_external(url):
                problems.append(f"{page}: <{tag}> {url}")
    _fail_if(problems, "HTML that loads from another host")


def test_math_is_typeset(reports):
    problems = []
    for page, r in reports.items():
        info = r.info
        if info.get("math"):
            if info["mathUntypeset"]:
                problems.append(
                    f"{page}: {len(info['mathUntypeset'])} of {info['math']} formulas not "
                    f"typeset, e.g. {info['mathUntypeset'][0]!r}"
                )
            if info["mathErrors"]:
                problems.append(f"{page}: MathJax errors {info['mathErrors'][:3]}")
        if info.get("rawTex"):
            problems.append(f"{page}: raw TeX left in the text: {info['rawTex']}")
    _fail_if(problems, "maths")


def test_mermaid_diagrams_are_svg(reports):
    problems = []
    for page, r in reports.items():
        for i, d in enumerate(r.info.get("diagrams", [])):
            if not d["svg"]:
                problems.append(f"{page}: diagram {i} was not drawn (no <svg>)")
            elif d["error"]:
                problems.append(f"{page}: diagram {i} is Mermaid's error picture")
            elif d["nodes"] == 0 or d["width"] < 50 or d["height"] < 30:
                problems.append(
                    f"{page}: diagram {i} is empty ({d['nodes']} nodes, {d['width']:.0f}x{d['height']:.0f} px)"
                )
    _fail_if(problems, "Mermaid diagrams")


def test_images_load(reports):
    problems = [
        f"{page}: {img['src']}" for page, r in reports.items() for img in r.info.get("images", []) if not img["ok"]
    ]
    _fail_if(problems, "images that did not load")


def test_no_javascript_errors(reports):
    problems = [
        f"{page}: {msg}"
        for page, r in reports.items()
        for msg in r.console_errors
        if not any(allowed in msg for allowed in CONSOLE_ALLOWED + BROWSER_OWN)
    ]
    _fail_if(problems, "errors in the browser console")


def test_internal_links_resolve(reports, server):
    host = urlsplit(server).netloc
    problems = []
    for page, r in reports.items():
        for href in sorted(set(r.info.get("links", []))):
            parts = urlsplit(href)
            if parts.scheme not in ("http", "https") or parts.netloc != host:
                continue  # external links are fine; javascript:, mailto: are not files
            rel = unquote(parts.path).lstrip("/")
            target = SITE / rel
            if rel == "" or rel.endswith("/"):
                target = target / "index.html"
            if not target.is_file():
                problems.append(f"{page}: link to missing {rel or '/'}")
                continue
            if parts.fragment and target.suffix == ".html":
                fragment = unquote(parts.fragment)
                if fragment not in _parse(target).ids:
                    problems.append(f"{page}: link to {rel}#{fragment}, an id that page lacks")
    _fail_if(problems, "broken internal links")


def test_front_page_screenshot(browser, server):
    """The front page (index.html redirects to the intro) as a reader sees it, saved for CI."""
    browser.get(server + "index.html")
    deadline = time.time() + PAGE_TIMEOUT_S
    while urlsplit(browser.current_url).path.endswith("/index.html") and time.time() < deadline:
        time.sleep(0.05)
    info = browser.execute_async_script(_INSPECT_JS, WAIT_S * 1000)
    assert info.get("title"), info
    assert not info["mathUntypeset"], info["mathUntypeset"]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    out = SCREENSHOTS / "front.png"
    assert browser.save_screenshot(str(out)), "Chromium did not take the screenshot"
    assert out.stat().st_size > 10_000, f"{out} is suspiciously small"


def test_pages_work_from_file_urls(browser):
    """A reader who opens the built files directly (file://) still gets maths and diagrams."""
    _require_prerequisites()
    checked_math = checked_diagrams = 0
    problems = []
    for page in site_pages():
        if _parse(SITE / page).refresh is not None:
            continue
        html = (SITE / page).read_text(encoding="utf-8", errors="replace")
        has_math = 'class="math' in html
        has_diagram = 'class="mermaid' in html
        if not (has_math and not checked_math) and not has_diagram:
            continue  # one maths page and every diagram page is enough
        info, requests, _, errors = _visit(browser, (SITE / page).as_uri())
        checked_math += has_math
        checked_diagrams += has_diagram
        if info.get("mathUntypeset"):
            problems.append(f"{page}: maths not typeset from file://")
        if any(not d["svg"] for d in info.get("diagrams", [])):
            problems.append(f"{page}: diagrams not drawn from file://")
        problems += [f"{page}: requested {u}" for u in requests if urlsplit(u).scheme in NETWORK_SCHEMES]
        problems += [f"{page}: {m}" for m in errors if not any(a in m for a in CONSOLE_ALLOWED + BROWSER_OWN)]
    assert checked_math and checked_diagrams, "found no page with maths or diagrams to check"
    _fail_if(problems, "pages opened from file://")


def test_no_raw_markdown_tables_or_stray_reprs():
    """Generated tables render as tables, and no cell leaves a repr like (None, None) behind."""
    if not (SITE / "index.html").is_file():
        if STRICT:
            pytest.fail(f"VITSSL_SITE_TEST=1 but {SITE / 'index.html'} not found", pytrace=False)
        pytest.skip(f"{SITE / 'index.html'} not found: run jupyter-book build .")
    problems = []
    for page in site_pages():
        problems += [f"{page}: {p}" for p in rendering_problems((SITE / page).read_text(encoding="utf-8"))]
    _fail_if(problems, "pages that show raw Markdown or stray reprs")


def _output(text: str) -> str:
    """A cell output block as myst-nb writes it, with the text HTML-escaped."""
    return f'<div class="cell_output docutils container"><div class="output text_plain"><pre>{html.escape(text)}</pre></div></div>'


def test_rendering_problems_finds_a_raw_table():
    raw = "<p>| method | kNN |\n| --- | ---: |\n| SimCLR | 81.2 |</p>"
    assert len(rendering_problems(raw)) == 1
    assert "raw Markdown table" in rendering_problems(raw)[0]
    assert rendering_problems("<p>|:---|---|</p>")  # alignment colons, no spaces


def test_rendering_problems_finds_stray_reprs():
    for text in (
        "(None, None)",
        "(None,)",
        "[None, None, None]",
        "None",
        "<Figure size 640x480 with 1 Axes>",
        "Text(0.5, 1.0, 'accuracy')",
        "[<matplotlib.lines.Line2D at 0x7f3a2c1d0e50>]",
    ):
        problems = rendering_problems(_output(text))
        assert len(problems) == 1 and "stray repr" in problems[0], (text, problems)
    # a repr on its own line after printed text counts too
    assert rendering_problems(_output("kNN 81.2 %\n(None, None)"))


def test_rendering_problems_accepts_a_good_page():
    good = (
        "<table><thead><tr><th>method</th><th>kNN</th></tr></thead>"
        "<tbody><tr><td>SimCLR</td><td>81.2</td></tr></tbody></table>"
        # a table written inside code or maths is not a rendering problem
        '<div class="cell_input"><pre>print("| --- | --- |")</pre></div>'
        "<p>Use <code>| --- | --- |</code> to write a table.</p>"
        '<div class="math notranslate">\\[ |x| - |y| \\]</div>'
        # an output that prints a table rule, or mentions None inside a sentence, is fine
        + _output("| --- | --- |\nbest k: None of the above\n(None, 3)")
        + "<p>A head returns (None, None) when no mask is given.</p>"
    )
    assert rendering_problems(good) == []


def test_rendering_problems_rejects_a_non_string():
    with pytest.raises(TypeError, match="page_html must be a str"):
        rendering_problems(b"<p>bytes</p>")


def test_site_pages_excludes_static_files(tmp_path):
    """site_pages lists the pages a reader visits, not the HTML shipped inside _static."""
    for rel in ("index.html", "book/intro.html", "_static/vendor/x.html", "_sources/a.html", "search.html"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("<html></html>")
    assert site_pages(tmp_path) == ["book/intro.html", "index.html", "search.html"]


def test_asset_parser_finds_external_loads_and_ids():
    parser = _AssetParser()
    parser.feed(
        '<script src="https://cdn.example.org/x.js"></script><link rel="stylesheet" '
        'href="_static/a.css"><img src="//img.example.org/p.png"><a href="https://x.org" '
        'id="top">x</a><meta http-equiv="Refresh" content="0; url=book/intro.html" />'
    )
    assert [u for _, u in parser.loads if _is_external(u)] == [
        "https://cdn.example.org/x.js",
        "//img.example.org/p.png",
    ]
    assert parser.ids == {"top"}
    assert parser.refresh == "book/intro.html"
