"""actcap view in a real browser: headless Chromium, driven by Selenium.

Each view is loaded and used (filters, a click on a token, the probe chart, a cell of the
similarity matrix, two runs side by side) with no console error, no script of the run's text
running, and a screenshot of each saved under test-artifacts/.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actcap.storage import open_run
from tests.browser import chromium
from tests.conftest import REPO
from tests.test_view import (
    HOSTILE_ANSWER,
    HOSTILE_CATEGORY,
    HOSTILE_ID,
    HOSTILE_QUESTION,
    N_QUESTIONS,
    Served,
    build_view_runs,
    loaded,
    make_app,
)

ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from chromium(tmp_path_factory.mktemp("chrome-profile"), "1280,1100", console_log=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    return build_view_runs(tmp_path_factory.mktemp("view-runs"), tiny_model_dir)


@pytest.fixture(scope="module")
def site(runs: tuple[Path, Path]) -> Iterator[str]:
    s = Served(loaded(make_app(list(runs))))
    yield f"http://127.0.0.1:{s.port}/"
    s.close()


def wait(driver: Any, script: str, timeout: float = 30) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: d.execute_script(script)
    )


def ready(driver: Any, view: str) -> None:
    wait(
        driver,
        f"const m = document.getElementById('main');"
        f"return m.dataset.state === 'ready' && m.dataset.view === '{view}';",
    )


def check_clean(driver: Any) -> None:
    """No console error or warning, no injected script ran, no image or frame was added."""
    logs = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert logs == [], logs
    assert driver.execute_script("return window.__pwned") is None
    assert driver.execute_script("return document.images.length + frames.length") == 0


def shot(driver: Any, name: str) -> None:
    driver.execute_script("window.scrollTo(0, 0)")
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000


def rows(driver: Any, table: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")


def set_table(driver: Any, table: str, action: Any, matched: int) -> None:
    driver.execute_script(f"document.getElementById('{table}').dataset.matched = '-1'")
    action()
    wait(
        driver,
        f"const t = document.getElementById('{table}');"
        f"return t.dataset.state === 'ready' && t.dataset.matched === '{matched}';",
    )


def test_run_view_filters_sorts_and_escapes(browser, site, runs):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    entries = open_run(runs[0]).entries
    n_right = sum(bool(e.correct) for e in entries)
    browser.get(site + "#/r0")
    ready(browser, "run")
    wait(browser, "return document.getElementById('questions').dataset.state === 'ready'")
    accuracy = browser.find_element(By.ID, "accuracy").text
    assert accuracy == f"{n_right / N_QUESTIONS:.3f}"
    assert browser.find_element(By.ID, "verification").text == "passed"
    assert browser.find_element(By.ID, "benchmark").text == "<img src=x onerror=window.__pwned=1>"
    assert len(rows(browser, "questions")) == N_QUESTIONS
    first = rows(browser, "questions")[0].find_elements(By.TAG_NAME, "td")
    assert first[0].text == HOSTILE_ID and first[2].text == HOSTILE_QUESTION
    assert first[3].text == HOSTILE_ANSWER
    grade = Select(browser.find_element(By.ID, "grade"))
    set_table(browser, "questions", lambda: grade.select_by_value("right"), n_right)
    assert len(rows(browser, "questions")) == n_right
    assert all(r.text.endswith(" right 1") for r in rows(browser, "questions"))
    set_table(browser, "questions", lambda: grade.select_by_value("all"), N_QUESTIONS)
    category = Select(browser.find_element(By.ID, "category"))
    set_table(browser, "questions", lambda: category.select_by_visible_text(HOSTILE_CATEGORY), 1)
    assert rows(browser, "questions")[0].get_attribute("data-id") == entries[1].id
    set_table(browser, "questions", lambda: category.select_by_value(""), N_QUESTIONS)
    search = browser.find_element(By.ID, "search")
    set_table(browser, "questions", lambda: search.send_keys(entries[5].id), 1)
    set_table(browser, "questions", lambda: search.clear() or search.send_keys(" "), N_QUESTIONS)
    set_table(
        browser,
        "questions",
        lambda: browser.find_element(By.CSS_SELECTOR, "#questions th[data-sort='id']").click(),
        N_QUESTIONS,
    )
    ids = [r.get_attribute("data-id") for r in rows(browser, "questions")]
    assert ids == sorted(ids, key=str.lower)
    check_clean(browser)
    shot(browser, "view_run.png")


def test_question_view_heatmap_hover_and_lens(browser, site, runs):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(site + "#/r0")
    wait(browser, "return document.getElementById('questions')?.dataset.state === 'ready'")
    browser.find_element(By.CSS_SELECTOR, "#questions tbody tr").click()  # the hostile one
    ready(browser, "question")
    assert browser.find_element(By.CSS_SELECTOR, "h1.qid").text == HOSTILE_ID
    assert browser.find_element(By.CSS_SELECTOR, ".question-text").text == HOSTILE_QUESTION
    wait(browser, "return document.getElementById('heatmap').dataset.state === 'ready'")
    tokens = browser.find_elements(By.CSS_SELECTOR, "#tokens .token")
    assert len(tokens) > 10 and tokens[1].text  # decoded text, not ids
    canvas = browser.find_element(By.ID, "heatmap")
    width = canvas.size["width"]
    cw = (width - 92) / len(tokens)
    ActionChains(browser).move_to_element_with_offset(
        canvas, int(90 + 2.5 * cw - width / 2), int(2 + 16 * 2.5 - canvas.size["height"] / 2)
    ).perform()
    tip = browser.find_element(By.ID, "tooltip")
    wait(browser, "return !document.getElementById('tooltip').hidden")
    assert tip.text.startswith("layer_1 · token #2") and "norm " in tip.text
    tokens[4].click()
    wait(browser, "return document.getElementById('lens').dataset.state === 'ready'")
    lens_rows = browser.find_elements(By.CSS_SELECTOR, "#lens tbody tr")
    assert [r.find_element(By.TAG_NAME, "td").text for r in lens_rows] == [
        "embeddings",
        "layer_0",
        "layer_1",
        "layer_2",
    ]
    assert browser.find_element(By.ID, "lens").get_attribute("data-token") == "4"
    assert wait(browser, "return Chart.getChart('profile-chart')?.data.datasets.length") == 4
    Select(browser.find_element(By.ID, "stat")).select_by_value("proj")
    wait(browser, "return document.getElementById('heatmap').dataset.stat === 'proj'")
    assert wait(browser, "return Chart.getChart('profile-chart')?.data.datasets.length") == 4
    check_clean(browser)
    shot(browser, "view_question.png")


def test_layers_view_probe_chart_and_similarity(browser, site):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get(site + "#/r0/layers")
    ready(browser, "layers")
    wait(
        browser,
        "return document.querySelector('#probe-chart').parentElement.dataset.state === 'ready'",
        timeout=60,
    )
    data = browser.execute_script(
        "const c = Chart.getChart('probe-chart');"
        "return c.data.datasets.map(d => [d.label, d.data.length]);"
    )
    assert data[2] == ["probe accuracy", 4] and data[3] == ["majority baseline", 4]
    assert "cross-validated" in browser.find_element(By.ID, "probe-note").text
    wait(browser, "return document.getElementById('similarity').dataset.state === 'ready'")
    shot(browser, "view_layers.png")
    check_clean(browser)
    canvas = browser.find_element(By.ID, "similarity")
    size = canvas.size
    # row 1, column N-2 of the matrix (edges of 9 px, cells of size (width - 11) / N)
    cell = (size["width"] - 11) / N_QUESTIONS
    x, y = 9 + cell * (N_QUESTIONS - 1.5), 9 + cell * 1.5
    ActionChains(browser).move_to_element_with_offset(
        canvas, int(x - size["width"] / 2), int(y - size["height"] / 2)
    ).click().perform()
    ready(browser, "pair")
    cards = browser.find_elements(By.CSS_SELECTOR, "#pair .question")
    assert len(cards) == 2
    a, b = (c.find_element(By.CSS_SELECTOR, "h1.qid").text for c in cards)
    assert a != b
    assert wait(browser, "return Chart.getChart('pair-chart')?.data.labels.length") == 4
    check_clean(browser)
    shot(browser, "view_pair.png")


def test_two_runs_side_by_side(browser, site, runs):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(site + "#/compare")
    ready(browser, "compare")
    wait(browser, "return document.getElementById('compare-table').dataset.state === 'ready'")
    assert browser.find_element(By.ID, "shared").text == str(N_QUESTIONS - 1)
    assert len(rows(browser, "compare-table")) == N_QUESTIONS - 1
    grades_b = {e.id: e.correct for e in open_run(runs[1]).entries}
    differ = sum(
        1 for e in open_run(runs[0]).entries if e.id in grades_b and e.correct != grades_b[e.id]
    )
    agreement = Select(browser.find_element(By.ID, "agreement"))
    set_table(browser, "compare-table", lambda: agreement.select_by_value("differ"), differ)
    set_table(browser, "compare-table", lambda: agreement.select_by_value("all"), N_QUESTIONS - 1)
    assert wait(browser, "return Chart.getChart('compare-chart')?.data.datasets.length") == 2
    shot(browser, "view_compare.png")
    rows(browser, "compare-table")[0].click()
    ready(browser, "compare")
    assert wait(browser, "return Chart.getChart('compare-q-chart')?.data.labels.length") == 4
    assert len(browser.find_elements(By.CSS_SELECTOR, "#compare-pair .question")) == 2
    check_clean(browser)
