"""The HTML report in a real browser: headless Chromium, driven by Selenium."""

import pytest

from actcap.analysis import build_report
from actcap.bench import EvalOptions, load_benchmark, run_benchmark
from actcap.capture import CaptureSpec
from actcap.storage import open_run
from tests.browser import chromium
from tests.conftest import DATA, REPO

ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    yield from chromium(tmp_path_factory.mktemp("chrome-profile"), "1200,1600")


def test_report_renders_and_filters(browser, tiny_lm, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    out = tmp_path / "run"
    bench = load_benchmark(f"mmlu:{DATA / 'mmlu' / 'test' / 'world_religions_test.csv'}").limited(
        16
    )
    result = run_benchmark(
        tiny_lm,
        bench,
        capture=CaptureSpec(),
        options=EvalOptions(batch_size=8),
        out=out,
        progress=False,
    )
    page = build_report(out, tmp_path / "report.html")
    browser.get(page.resolve().as_uri())

    assert browser.find_element(By.ID, "accuracy").text == f"{result.accuracy:.3f}"
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) >= 6
    assert all(
        browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
        for img in images
    )

    def visible_rows():
        return [
            r
            for r in browser.find_elements(By.CSS_SELECTOR, "#samples tbody tr")
            if r.is_displayed()
        ]

    assert len(visible_rows()) == 16
    Select(browser.find_element(By.ID, "grade")).select_by_value("true")
    assert len(visible_rows()) == result.n_correct
    Select(browser.find_element(By.ID, "grade")).select_by_value("all")
    first_id = open_run(out).entries[0].id
    browser.find_element(By.ID, "filter").send_keys(first_id)
    rows = visible_rows()
    assert len(rows) == 1 and first_id in rows[0].text
    browser.find_element(By.ID, "filter").clear()
    browser.find_element(By.ID, "filter").send_keys(" ")  # input event after clear
    browser.find_element(By.CSS_SELECTOR, "#samples th").click()  # sort by id
    ids = [r.find_element(By.TAG_NAME, "td").text for r in visible_rows()]
    assert ids == sorted(ids)
    browser.execute_script("window.scrollTo(0, 0)")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "report.png"))
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


def test_hostile_run_values_run_no_script(browser, tmp_path):
    """Markup in ids, questions, grades, categories, results, config and site names stays text."""
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    from tests.test_report_escaping import CONFIG, CORRECT, HOSTILE, SITE, hostile_run

    page = build_report(hostile_run(tmp_path / "run"), tmp_path / "report.html")
    browser.get(page.resolve().as_uri())
    assert browser.find_element(By.ID, "accuracy").text == "unknown"
    cells = browser.find_elements(By.CSS_SELECTOR, "#samples tbody tr:first-child td")
    assert [c.text for c in cells] == [
        HOSTILE["id"],
        HOSTILE["question"],
        HOSTILE["response"],
        HOSTILE["reference"],
        CORRECT[0],
        "plain",
    ]
    # every inline handler that an injected attribute could carry, fired on every element
    browser.execute_script(
        "for (const e of document.querySelectorAll('*'))"
        " for (const t of ['mouseover', 'click', 'focus', 'load', 'error'])"
        "  e.dispatchEvent(new Event(t, {bubbles: true}));"
    )
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - raises when no alert is open
    assert browser.execute_script("return window.pwned") is None
    assert browser.execute_script("return document.scripts.length") == 1
    body = browser.find_element(By.TAG_NAME, "body").text
    assert HOSTILE["category"] in body and SITE in body
    assert CONFIG["model"] in browser.find_element(By.ID, "config").text
