"""The HTML report as a person sees it: opened from disk in real headless Chromium (Debian's
/usr/bin/chromium, driven by Playwright), with no network: row labels, the chance row, an interval beside
every number, every plot loaded from its data: URI, and a screenshot."""

from __future__ import annotations

import pytest

from perceive_ray.report.command import run_report
from tests.component.test_report import FINISHED, write_sweep
from tests.fixtures.browser import chromium

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


def test_report_page_in_chromium(browser, tmp_path):
    sweep_dir = write_sweep(tmp_path / "data")
    index = run_report(sweep_dir=sweep_dir, out=tmp_path / "out", n_resamples=2000)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(index.as_uri())
    page.wait_for_load_state("load")

    results = page.locator("table.results")
    assert results.locator("thead th").first.inner_text() == "Configuration"
    row_labels = results.locator("tbody tr:not(.chance) th[scope=row]").all_inner_texts()
    assert row_labels == [label for label, _ in FINISHED]
    chance = results.locator("tbody tr.chance")
    assert chance.count() == 1 and chance.locator("th").inner_text() == "chance"
    assert chance.locator("td").first.inner_text() == "50.0%" and chance.is_visible()
    # Every number of a configuration has its interval beside it (ROC-AUC says it has none).
    # One round trip for all cells: [text, number of .ci spans, the span's rendered width].
    cells = results.locator("tbody tr:not(.chance) td").evaluate_all(
        "tds => tds.map(td => [td.innerText, td.querySelectorAll('span.ci').length,"
        " td.querySelector('span.ci') ? td.querySelector('span.ci').getBoundingClientRect().width : 0])")
    assert len(cells) == 3 * 9
    for text, spans, width in cells:
        assert spans == 1 and width > 0, text
    assert "paper: 1.9%" in results.inner_text() and "paper: 10.8%" in results.inner_text()

    images = page.locator("img").evaluate_all(
        "imgs => imgs.map(img => [img.complete, img.naturalWidth, img.naturalHeight, img.src.slice(0, 22)])")
    assert len(images) == 3
    for complete, width, height, src in images:
        assert complete and width > 0 and height > 0 and src == "data:image/png;base64,"
    assert all(url.startswith(("file:", "data:")) for url in requests), requests  # self-contained: no fetches

    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.close()
