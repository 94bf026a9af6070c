"""The report: one self-contained HTML file that renders in a real browser, with counts equal to the
metadata's, an example section per drop reason, and captions shown as text, never as markup.

The run uses `curate-vit-tiny-64` with random weights for both scorers: scores and clusters are
meaningless, which is fine for checking that they are plotted. The browser test drives Debian's
`chromium` through Playwright (no browser download: it is given the executable).
"""

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from pipeline.io.catalog import connect
from pipeline.reasons import REASON_NAMES
from pipeline.runner import run_pipeline
from pipeline.stages import report
from tests.helpers import jpeg_bytes, make_tar, png_header_only, run_config

pytestmark = pytest.mark.usefixtures("ray_local")

TINY = "curate-vit-tiny-64"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
# Captions written to be dangerous if pasted into HTML unescaped. The smallest uids of the pool,
# so each is the first example of whatever group it ends up in.
HOSTILE_UID = "0" * 32
HOSTILE_CAPTION = ('a red square on a table <script>document.title="pwned"</script> '
                   '<img src="https://example.invalid/x.png" onerror="document.title=\'pwned\'"> " onmouseover="x & y')
SHORT_HOSTILE_UID = "0" * 31 + "1"
SHORT_HOSTILE_CAPTION = "<script>alert(1)</script>"  # one word: caption_too_short


def _hostile_shard(folder: Path) -> None:
    folder.mkdir()
    members = []
    for key, uid, caption, colour in [("h0", HOSTILE_UID, HOSTILE_CAPTION, (20, 120, 220)),
                                      ("h1", SHORT_HOSTILE_UID, SHORT_HOSTILE_CAPTION, (230, 200, 30))]:
        members += [(f"{key}.jpg", jpeg_bytes(320, 240, colour)), (f"{key}.txt", caption.encode()),
                    (f"{key}.json", json.dumps({"uid": uid}).encode())]
    (folder / "00000000.tar").write_bytes(make_tar(members))


@pytest.fixture(scope="module")
def run_dir(synth_pool, tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    _hostile_shard(base / "hostile")
    out = base / "out"
    config = run_config(
        synth_pool, out, embed={"model": TINY}, dfn={"model": TINY},
        select={"clip": {"fraction": 0.8}, "dbp": {"enabled": True, "target": 200, "k": 8}},
    )
    config.input = [str(synth_pool), str(base / "hostile")]
    run_pipeline(config)
    return out


@pytest.fixture(scope="module")
def page_html(run_dir):
    return (run_dir / "report.html").read_text(encoding="utf-8")


def metadata_counts(run_dir) -> dict[str, int]:
    con = connect(str(run_dir))
    counts = dict(con.execute("select coalesce(drop_reason, 'kept'), count(*) from samples group by 1").fetchall())
    counts["total"] = sum(counts.values())
    return counts


class _Elements(HTMLParser):
    """Every start tag with its attributes, as the HTML parser of a browser would tokenise them."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def elements(page: str) -> list[tuple[str, dict]]:
    parser = _Elements()
    parser.feed(page)
    return parser.tags


# -- without a browser -----------------------------------------------------------------------

def test_the_pipeline_writes_it_and_the_command_regenerates_it(run_dir, page_html, tmp_path, capsys):
    from pipeline.cli import main

    assert page_html.startswith("<!DOCTYPE html>")
    assert len(page_html) < 4 * 2**20
    again = tmp_path / "again.html"
    assert main(["report", str(run_dir), "--out", str(again)]) == 0
    assert str(again) in capsys.readouterr().out
    assert again.read_text(encoding="utf-8") == page_html  # same run, same report: no dates, fixed plot ids


def test_nothing_is_loaded_from_elsewhere_and_no_markup_comes_from_the_data(page_html):
    tags = elements(page_html)
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object", "embed", "base", "form")]
    for tag, attrs in tags:
        assert not [name for name in attrs if name.startswith("on")], (tag, attrs)
        for name in ("src", "srcset", "poster", "data", "action"):
            if name in attrs:
                assert attrs[name].startswith("data:image/"), (tag, name, attrs[name][:80])
        if "href" in attrs:
            assert attrs["href"].startswith("#"), attrs["href"]
    assert not re.search(r"url\(\s*['\"]?(?!data:|#)", page_html)
    csp = next(a["content"] for t, a in tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in csp and "script-src" not in csp
    # the hostile captions are there, as text
    assert "&lt;script&gt;document.title=&quot;pwned&quot;&lt;/script&gt;" in page_html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page_html
    assert "example.invalid" not in "".join(v or "" for _, a in tags for v in a.values())


def test_plots_are_svg_without_external_references(page_html):
    plots = re.findall(r'<img class="plot" id="([^"]+)" src="data:image/svg\+xml;base64,([^"]+)"', page_html)
    assert {name for name, _ in plots} == {"counts-chart", "clip_score-histogram", "dfn_score-histogram", "dbp-plot"}
    for name, data in plots:
        svg = base64.b64decode(data).decode("utf-8")
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg, name
        assert not re.search(r'(?:href|src)="(?!#|data:)', svg), name
        assert not re.search(r"url\((?!#)", svg), name


def test_images_that_must_not_be_decoded_are_not_and_broken_ones_become_text(run_dir):
    inputs = report.ReportInputs(str(run_dir), {"config": {}}, None, frozenset(), frozenset())
    good = report._thumbnail(jpeg_bytes(800, 400), 160, 10**8, "u")
    uri = re.search(r'src="data:image/jpeg;base64,([^"]+)"', good).group(1)
    assert Image.open(io.BytesIO(base64.b64decode(uri))).size == (160, 80)
    assert "does not decode" in report._thumbnail(b"\xff\xd8\xff\xe0 not a jpeg", 160, 10**8, "u")
    assert "not decoded" in report._thumbnail(png_header_only(30_000, 30_000), 160, 10**8, "u")  # Pillow's limit
    assert "not decoded: 2000x2000" in report._thumbnail(png_header_only(2000, 2000), 160, 10**6, "u")  # the run's
    # a reason in NOT_DECODED never reaches the shard: no shard is listed, yet the tile says why
    samples = [{"uid": "a", "partition": 0, "drop_reason": reason, "image_offset": 0, "image_size": 10}
               for reason in sorted(report.NOT_DECODED)]
    for reason, tile in zip(sorted(report.NOT_DECODED), report._pictures(inputs, samples)):
        assert f"not decoded ({reason})" in tile and "<img" not in tile


def test_a_missing_input_skips_its_section_with_a_note(run_dir, tmp_path):
    def evaluation(inputs):
        raise report.Missing("no evaluation results in this run")

    def extra(inputs):
        return "<p>extra section</p>"

    page = report.build_report(str(run_dir), sections=[
        report.Section("evaluation", "Evaluation", evaluation), report.Section("extra", "Extra", extra),
    ])
    assert '<section id="evaluation" class="skipped">' in page and "no evaluation results in this run" in page
    assert '<section id="extra"><h2>Extra</h2>' in page and "<p>extra section</p>" in page
    # a run folder holding only its metadata: no manifest, no clusters; the report still renders
    bare = tmp_path / "bare"
    shutil.copytree(run_dir / "metadata", bare / "metadata")
    page = report.build_report(str(bare))
    for section in ("overview", "stages", "dbp"):
        assert f'<section id="{section}" class="skipped">' in page
    assert '<section id="counts">' in page and "source shard not listed in manifest.json" in page


# -- in a browser ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser_page(run_dir, tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y --no-install-recommends chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (uses the system chromium)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    requests: list[str] = []
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = context.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.goto((run_dir / "report.html").as_uri(), wait_until="load")
            page.screenshot(path=str(profile.parent / "report.png"), full_page=True)
            yield page, requests
        finally:
            context.close()


def test_every_image_and_plot_renders(browser_page):
    page, _ = browser_page
    images = page.evaluate("""[...document.images].map(i => ({
        plot: i.classList.contains('plot'), ok: i.complete && i.naturalWidth > 0 && i.naturalHeight > 0,
        w: i.getBoundingClientRect().width, h: i.getBoundingClientRect().height, id: i.id}))""")
    assert len(images) > 40
    assert all(i["ok"] for i in images), [i for i in images if not i["ok"]][:3]
    plots = [i for i in images if i["plot"]]
    assert {p["id"] for p in plots} == {"counts-chart", "clip_score-histogram", "dfn_score-histogram", "dbp-plot"}
    assert all(p["w"] > 200 and p["h"] > 100 for p in plots), plots
    assert page.evaluate("document.body.scrollWidth") <= 1280  # nothing overflows the viewport sideways


def test_the_counts_table_equals_the_metadata(browser_page, run_dir):
    page, _ = browser_page
    shown = page.evaluate("""Object.fromEntries([...document.querySelectorAll('#counts-table tr[data-key]')]
        .map(tr => [tr.dataset.key, tr.querySelector('td.n').textContent]))""")
    assert {key: int(value.replace(",", "")) for key, value in shown.items()} == metadata_counts(run_dir)
    order = page.evaluate("[...document.querySelectorAll('#counts-table tbody tr')].map(tr => tr.dataset.key)")
    reasons = order[:-1]
    assert order[-1] == "kept" and reasons == sorted(reasons, key=REASON_NAMES.index)


def test_each_drop_reason_has_its_examples(browser_page, run_dir):
    page, _ = browser_page
    groups = page.evaluate("""Object.fromEntries([...document.querySelectorAll('#examples .group')]
        .map(g => [g.id, g.querySelectorAll('figure.tile').length]))""")
    present = set(metadata_counts(run_dir)) - {"total"}
    assert {f"examples-{name}" for name in present} == set(groups)
    assert all(0 < n <= 8 for n in groups.values()), groups
    assert {"exact_duplicate", "near_duplicate", "clip_score", "dbp_pruned", "corrupt_image"} <= present
    broken = page.evaluate("[...document.querySelectorAll('#examples-corrupt_image .text-tile')].length")
    assert broken == groups["examples-corrupt_image"]  # shown as text, never as a broken image
    assert page.evaluate("document.querySelectorAll('#dedup .pair').length") >= 2


def test_captions_are_text_and_nothing_is_fetched(browser_page):
    page, requests = browser_page
    assert page.evaluate("document.querySelectorAll('script, iframe, object, embed, link').length") == 0
    assert page.title().startswith("Curate report") and "pwned" not in page.title()
    captions = page.evaluate("""Object.fromEntries([...document.querySelectorAll('figure.tile[data-uid]')]
        .map(f => [f.dataset.uid, f.querySelector('.caption').textContent]))""")
    assert captions[HOSTILE_UID] == HOSTILE_CAPTION
    assert captions[SHORT_HOSTILE_UID] == SHORT_HOSTILE_CAPTION
    assert page.evaluate("""[...document.querySelectorAll('*')].flatMap(e => [...e.attributes])
        .filter(a => /^(src|href|srcset|poster|action|data)$/.test(a.name))
        .filter(a => !a.value.startsWith('data:') && !a.value.startsWith('#')).map(a => a.value)""") == []
    page_url = page.url
    assert [url for url in requests if url != page_url and not url.startswith("data:")] == []
