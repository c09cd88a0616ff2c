"""The built website, checked over its HTML and in a real browser (``nox -s docs`` runs this).

Needs the site built by ``python -m bn_ref.site build`` (``BN_REF_SITE_DIR``, default
``build/site``); the browser tests also need Debian's ``chromium`` and ``chromium-driver``
(``apt-get install chromium chromium-driver``) and the ``selenium`` package. Each missing piece skips
with its reason. The pages are served from 127.0.0.1 by a thread of this process. Screenshots of
spec §3 and of the matrix go to ``BN_REF_SCREENSHOT_DIR`` (default ``build/screenshots``).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest

import bn_ref

REPO = Path(__file__).resolve().parent.parent
SITE = Path(os.environ.get("BN_REF_SITE_DIR", REPO / "build" / "site"))
SHOTS = Path(os.environ.get("BN_REF_SCREENSHOT_DIR", REPO / "build" / "screenshots"))
REPORT = json.loads((REPO / "conformance" / "report.json").read_text(encoding="utf-8"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(not (SITE / "index.html").is_file(),
                                reason=f"the site is not built at {SITE}: run `nox -s docs` (or "
                                       "`python -m bn_ref.site build` with the docs extra)")


class _Page(HTMLParser):
    """Ids, links (a href) and asset references (script/link/img src/href) of one HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.assets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for k in ("id", "name"):
            if a.get(k) and (k == "id" or tag == "a"):
                self.ids.add(a[k] or "")
        if tag == "a" and a.get("href"):
            self.links.append(a["href"] or "")
        elif tag in ("script", "img", "source", "iframe") and a.get("src"):
            self.assets.append(a["src"] or "")
        elif tag == "link" and a.get("href"):
            self.assets.append(a["href"] or "")


@functools.cache
def _parse(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _pages() -> list[Path]:
    return sorted(SITE.rglob("*.html"))


def test_link_check_every_internal_link_and_anchor_resolves():
    pages = _pages()
    assert len(pages) >= 10
    checked, external, broken = 0, set(), []
    for page in pages:
        parsed = _parse(page)
        for href in parsed.links + parsed.assets:
            parts = urlsplit(href)
            if parts.scheme in ("http", "https", "mailto"):
                external.add(href)
                continue
            assert not parts.scheme and not parts.netloc, f"{page}: {href}"
            if parts.path.startswith("/"):  # 404.html: absolute paths, for a server at the site root
                target = (SITE / unquote(parts.path).lstrip("/")).resolve()
            else:
                target = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            checked += 1
            if not target.is_file():
                broken.append(f"{page.relative_to(SITE)} -> {href} (no file)")
            elif parts.fragment and target.suffix == ".html" and unquote(parts.fragment) not in _parse(target).ids:
                broken.append(f"{page.relative_to(SITE)} -> {href} (no anchor)")
    assert not broken, "\n".join(broken[:50])
    assert checked > 1000
    # the only external addresses are links a reader may follow, never assets loaded at view time
    for page in pages:
        for src in _parse(page).assets:
            assert urlsplit(src).scheme not in ("http", "https"), f"{page}: loads {src}"


def test_every_spec_version_has_every_section_anchor():
    spec = (REPO / "docs" / "spec.md").read_text(encoding="utf-8")
    sections = re.findall(r"^#{2,4} (\d+(?:\.\d+)*)\.? +[A-Z]", spec, re.M)
    assert len(sections) >= 40
    versions = sorted(p.parent.name for p in (SITE / "spec").glob("*/index.html"))
    assert bn_ref.SPEC_VERSION in versions
    for v in versions:
        ids = _parse(SITE / "spec" / v / "index.html").ids
        old = [s for s in sections if f"§{s}" not in ids]
        # an older version may lack sections added later, never the first eleven chapters
        assert not [s for s in old if "." not in s and int(s) <= 11], (v, old)
        if v == bn_ref.SPEC_VERSION:
            assert not old and {"changelog", "conformance", f"changelog-{v}"} <= ids
    assert _parse(SITE / "spec" / "index.html").ids >= {f"§{s}" for s in sections}


def test_vectors_archive_listed_with_its_checksum():
    import hashlib

    page = (SITE / "downloads.html").read_text(encoding="utf-8")
    arch = SITE / "downloads" / f"bn-ref-vectors-{bn_ref.SPEC_VERSION}.tar.gz"
    assert arch.is_file()
    assert hashlib.sha256(arch.read_bytes()).hexdigest() in page


# -- in Chromium ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_url():
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver); no browser build is downloaded")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[docs]')")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
              "--disable-gpu", "--no-first-run", "--disable-extensions"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def _wait(browser, script: str, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while True:
        v = browser.execute_script(script)
        if v or time.monotonic() > end:
            return v
        time.sleep(0.1)


MATH_DONE = ("return !!(window.MathJax && MathJax.startup && MathJax.startup.promise && "
             "(window.__bnMath || (MathJax.startup.promise.then(() => window.__bnMath = 1), 0)))")
RAW_TEX = ("const main = document.querySelector('article') || document.body;"
           "const c = main.cloneNode(true); c.querySelectorAll('pre, code, mjx-container, script').forEach(e => e.remove());"
           "return c.textContent;")


@pytest.mark.parametrize("page", ["spec/index.html", f"spec/{bn_ref.SPEC_VERSION}/index.html", "results.html"])
def test_formulas_render_without_raw_tex(browser, base_url, page):
    static = (SITE / page).read_text(encoding="utf-8").count('class="arithmatex"')
    browser.get(base_url + page)
    assert _wait(browser, MATH_DONE), "MathJax did not finish"
    counts = browser.execute_script(
        "const m = [...document.querySelectorAll('.arithmatex')];"
        "return [m.length, m.filter(e => e.querySelector('mjx-container svg')).length,"
        " m.filter(e => e.querySelector('mjx-merror')).length,"
        " m.filter(e => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; }).length];")
    assert counts[0] == static
    assert counts[1] == counts[0] and counts[2] == 0 and counts[3] == counts[0], counts
    if page.startswith("spec/"):
        assert static > 300
    text = browser.execute_script(RAW_TEX)
    leftovers = re.findall(r"\\[a-zA-Z]{2,}|\\\(|\\\[|\$\$|\$[^$\s][^$]*\\[^$]*\$", text)
    assert not leftovers, leftovers[:10]


def test_spec_section_3_screenshot_and_anchor(browser, base_url):
    url = base_url + f"spec/{bn_ref.SPEC_VERSION}/index.html#%C2%A73"
    browser.get(url)
    assert _wait(browser, MATH_DONE)
    browser.execute_script("document.getElementById('§3').scrollIntoView()")
    time.sleep(0.3)
    top = browser.execute_script("return document.getElementById('§3').getBoundingClientRect().top")
    assert 0 <= top < 200
    SHOTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SHOTS / "spec-section-3.png"))


def test_in_page_anchors_resolve_in_the_browser(browser, base_url):
    bad, n = [], 0
    for page in _pages():
        rel = page.relative_to(SITE).as_posix()
        if rel.startswith("search/") or rel == "404.html":
            continue
        browser.get(base_url + rel)
        missing = browser.execute_script(
            "return [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href'))"
            ".filter(h => h.startsWith('#') && h.length > 1)"
            ".filter(h => !document.getElementById(decodeURIComponent(h.slice(1))));")
        n += browser.execute_script("return document.querySelectorAll('a[href^=\"#\"]').length")
        bad += [f"{rel} -> {h}" for h in missing]
    assert n > 500 and not bad, bad[:20]


def test_version_switcher_keeps_the_section(browser, base_url):
    from selenium.webdriver.support.ui import Select

    versions = sorted(p.parent.name for p in (SITE / "spec").glob("*/index.html"))
    if len(versions) < 2:
        pytest.skip("only one spec version built (no git history)")
    other = next(v for v in versions if v != bn_ref.SPEC_VERSION)
    browser.get(base_url + f"spec/{bn_ref.SPEC_VERSION}/index.html#%C2%A73.4")
    Select(browser.find_element("css selector", "select.bn-version-select")).select_by_value(
        f"../../spec/{other}/index.html")
    assert _wait(browser, f"return location.pathname.endsWith('/spec/{other}/index.html')", 10)
    assert unquote(browser.execute_script("return location.hash")) == "#§3.4"
    assert browser.execute_script("return !!document.getElementById('§3.4')")


def _visible_rows(browser) -> list[str]:
    return browser.execute_script(
        "return [...document.querySelectorAll('#bn-matrix-table tbody tr.bn-row')].map(r => r.cells[0].firstChild.textContent)")


def _cell_choice() -> tuple[int, str, str]:
    """The matrix cell the test opens: the first with the worst non-passing status in the report."""
    for want in ("fail", "error", "xfail", "skip"):
        for i, a in enumerate(REPORT["adapters"]):
            for g, cell in a["groups"].items():
                if cell.get("status") == want:
                    return i, g, want
    return 0, next(iter(REPORT["adapters"][0]["groups"])), "pass"


def test_matrix_filters_and_cell_details(browser, base_url):
    from selenium.webdriver.support.ui import Select

    from bn_ref.site import framework_of

    adapters = REPORT["adapters"]
    browser.get(base_url + "matrix.html")
    assert _wait(browser, "return document.querySelectorAll('#bn-matrix-table tbody tr').length > 0", 10)
    assert _visible_rows(browser) == [a["name"] for a in adapters]
    groups = list(dict.fromkeys(g for a in adapters for g in a["groups"]))
    assert browser.execute_script("return [...document.querySelectorAll('#bn-matrix-table th.bn-gcol')]"
                                  ".map(t => t.textContent)") == groups
    ki, group, status = _cell_choice()
    kname = adapters[ki]["name"]

    def pick(sel_id: str, value: str) -> None:
        Select(browser.find_element("id", sel_id)).select_by_value(value)

    fw = framework_of(kname)
    pick("bn-f-framework", fw)
    assert _visible_rows(browser) == [a["name"] for a in adapters if framework_of(a["name"]) == fw]
    pick("bn-f-framework", "")
    conv = adapters[ki]["convention"]["name"]
    pick("bn-f-convention", conv)
    assert _visible_rows(browser) == [a["name"] for a in adapters if a["convention"]["name"] == conv]
    pick("bn-f-convention", "")
    pick("bn-f-group", group)
    assert browser.execute_script("return [...document.querySelectorAll('#bn-matrix-table th.bn-gcol')]"
                                  ".filter(t => !t.hidden).map(t => t.textContent)") == [group]
    assert browser.execute_script("return document.querySelectorAll('#bn-matrix-table tbody tr')[0]"
                                  ".querySelectorAll('td.bn-cell').length") == 1
    pick("bn-f-status", status)
    with_status = [a["name"] for a in adapters if a["groups"].get(group, {}).get("status") == status]
    assert kname in with_status and _visible_rows(browser) == with_status
    pick("bn-f-status", "")

    # dtype: a cell shows the worst non-passing status of that dtype's checks, else pass
    cell = f"#bn-matrix-table tr[data-row='{ki}'] td[data-group='{group}']"
    np_checks = [c for c in REPORT["non_pass_checks"] if c["adapter"] == kname and c["group"] == group]
    dtype_of = {c["id"]: c["dtype"] for c in REPORT["cases"]}
    order = ["fail", "error", "xfail", "skip"]
    for dtype in sorted(set(dtype_of.values())):
        got = [c["status"] for c in np_checks if dtype_of.get(c["case"], c["case"].rsplit("-", 1)[-1]) == dtype]
        want = min(got, key=order.index) if got else "pass"
        pick("bn-f-dtype", dtype)
        assert browser.find_element("css selector", cell).get_attribute("data-status") == want, dtype
    pick("bn-f-dtype", "")

    # one click: the non-passing checks, the worst error, the ledger reason and a reproduction command
    browser.find_element("css selector", cell).click()
    detail = browser.find_element("id", "bn-detail")
    assert detail.is_displayed()
    rows = detail.find_elements("css selector", "tr.bn-check")
    case_skips = [c for c in REPORT["non_pass_checks"] if c["adapter"] == kname and c["group"] == "case"]
    assert len(rows) == min(300, len(np_checks) + len(case_skips))
    units = [c["units"] for c in np_checks if isinstance(c["units"], (int, float))]
    if units:
        worst = re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{max(units):.2e}")  # JavaScript's toExponential(2)
        assert f"at {worst} × tolerance" in detail.find_element("css selector", ".bn-worst").text
    reasons = {c["reason"] for c in np_checks + case_skips if c["reason"]}
    shown = {e.text.removeprefix("Ledger reason: ") for e in detail.find_elements("css selector", ".bn-reason")}
    assert reasons == shown
    if np_checks:
        assert "python -m bn_ref.conformance --no-ledger" in detail.find_element("css selector", "pre.bn-repro").text
    assert browser.execute_script("return location.hash") == f"#cell={ki}/{group}"
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.execute_script("document.getElementById('bn-detail').scrollIntoView()")
    assert browser.save_screenshot(str(SHOTS / "matrix-cell-detail.png"))
    pick("bn-f-group", "")  # the whole matrix, every row, for review
    browser.set_window_size(1400, 2600)
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(SHOTS / "matrix.png"))
    browser.set_window_size(1400, 1000)

    # the cell's address reopens it (in a fresh load of the page)
    browser.get("about:blank")
    browser.get(base_url + f"matrix.html#cell={ki}/{group}")
    assert _wait(browser, "return !document.getElementById('bn-detail').hidden", 10)
    assert len(browser.find_elements("css selector", "#bn-detail tr.bn-check")) == len(rows)


def test_glance_answers_which_store_the_unbiased_variance(browser, base_url):
    from selenium.webdriver.support.ui import Select

    browser.get(base_url + "matrix.html#glance")
    assert _wait(browser, "return document.querySelectorAll('#bn-glance-rows select').length > 0", 10)
    col = browser.execute_script("return [...document.querySelectorAll('#bn-glance-rows thead tr:first-child th')]"
                                 ".map(t => t.textContent).indexOf('running var')")
    Select(browser.find_element("css selector", f"#bn-glance-rows select[data-col='{col}']")).select_by_value("unbiased")
    shown = browser.execute_script("return [...document.querySelectorAll('#bn-glance-rows tbody tr')]"
                                   ".filter(r => !r.hidden).map(r => r.cells[0].textContent)")
    want = [a["name"] for a in REPORT["adapters"] if a["convention"].get("running_var") == "unbiased"]
    assert want and shown == want
    fcol = browser.execute_script("return [...document.querySelectorAll('#bn-glance-facts thead tr:first-child th')]"
                                  ".map(t => t.textContent).indexOf('running var')")
    Select(browser.find_element("css selector", f"#bn-glance-facts select[data-col='{fcol}']")).select_by_value(
        "unbiased")
    frameworks = browser.execute_script("return [...document.querySelectorAll('#bn-glance-facts tbody tr')]"
                                        ".filter(r => !r.hidden).map(r => r.cells[0].textContent)")
    # expected from the spec's generated §9 table itself (the Markdown source, parsed here)
    block = re.search(r"<!-- facts-table:begin -->\n(.*?)\n<!-- facts-table:end -->",
                      (REPO / "docs" / "spec.md").read_text(encoding="utf-8"), re.S).group(1)
    lines = [ln.strip().strip("|").split(" | ") for ln in block.splitlines() if ln.strip().startswith("|")]
    j = [c.strip() for c in lines[0]].index("running var")
    want_fw = [r[0].strip().replace("`", "") for r in lines[2:] if r[j].strip() == "unbiased"]
    assert any(w.startswith("PyTorch") for w in want_fw) and frameworks == want_fw


def test_no_console_errors_on_the_main_pages(browser, base_url):
    for page in ("index.html", "matrix.html", f"spec/{bn_ref.SPEC_VERSION}/index.html", "downloads.html"):
        browser.get(base_url + page)
        time.sleep(0.5)
        errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
        assert not errors, (page, errors)


def test_works_from_the_file_system(browser):
    browser.get(urljoin("file://", str(SITE / "matrix.html")))
    assert _wait(browser, "return document.querySelectorAll('#bn-matrix-table tbody tr').length > 0", 10)
    assert len(_visible_rows(browser)) == len(REPORT["adapters"])
