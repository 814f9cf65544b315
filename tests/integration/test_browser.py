"""The try-it page (``GET /``) in a real browser: Debian's chromium, headless, driven by selenium, against real
``python -m service`` processes on loopback (the embedded pretrained MobileNetV2, whose own classifier is the
builtin ``imagenet`` task).

- Open server: the page lists the tasks (labels, version, method, accuracy), classifies scikit-image's
  chelsea photo as a cat with score bars and latencies, shows labels that look like HTML as text (never
  markup), and shows an API error's JSON detail.
- Secured server (classify token): the page asks for the token after the 401, says a wrong one is refused
  (403), and works with the right one.

The browser's console must stay free of errors (a CSP violation or a script error shows there) other than
the failed requests a test causes on purpose. Each test leaves a screenshot of its last state in
``tests/artifacts/`` (its path is printed), passed or failed. Skipped when chromium, chromedriver or selenium
is absent (scripts/bootstrap.sh installs them).
"""

from __future__ import annotations

import base64
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from skimage import data as skdata

from bench.servers import ServerProcess, stopping
from repadapter import LocalStore, Manifest, TaskBundle
from tests.servicekit import Model

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # pragma: no cover - the dev extra installs it
    webdriver = None

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
CHELSEA = Path(skdata.data_dir) / "chelsea.png"
COFFEE = Path(skdata.data_dir) / "coffee.png"
CAT_LABELS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}  # ImageNet 281-285
TOKEN = "browser-classify-0123456789abcdef"
FLAGS = ("--store-poll-s", "0", "--torch-threads", "1", "--no-warmup", "--log-level", "warning")
SERVER_START_S = 40
WAIT_S = 20
# Labels a user might upload: markup, entities, quotes. The page must show them as typed.
MARKUP_LABELS = ['<img src=x onerror="document.title=1">', "<b>bold</b>", "fish &amp; chips", "it's \"quoted\"",
                 "plain", "sixth"]

if webdriver is None:
    pytestmark.append(pytest.mark.skip(reason="selenium is not installed (pip install -e '.[dev]')"))
elif CHROMIUM is None or CHROMEDRIVER is None:
    pytestmark.append(pytest.mark.skip(reason="chromium and chromium-driver are not installed (Debian: apt-get "
                                              "install chromium chromium-driver; scripts/bootstrap.sh does)"))


def serve(store: Path, log: Path, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """A server over ``store``, ready within SERVER_START_S, stopped in every case."""
    with stopping(ServerProcess(store.name, "service", ["--store", str(store), *FLAGS], log, env=env)) as server:
        try:
            server.wait_ready(SERVER_START_S)
        except RuntimeError as e:
            raise AssertionError(str(e)) from None
        yield server


@pytest.fixture(scope="module")
def open_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """No tokens; the builtin ``imagenet`` and a ``markup`` task whose labels look like HTML."""
    root = tmp_path_factory.mktemp("open")
    bundle = Model.load("embedded").bundle("markup", 1, classes=len(MARKUP_LABELS), adapters=False, size=64)
    manifest = Manifest.model_validate({**bundle.manifest.model_dump(), "labels": MARKUP_LABELS,
                                        "metrics": {"val_accuracy": 0.5, "test_accuracy": 0.875}})
    LocalStore(root / "store").put(TaskBundle(manifest, bundle.adapters, bundle.head_weight, bundle.head_bias))
    yield from serve(root / "store", root / "server.log")


@pytest.fixture(scope="module")
def secured_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """A classify token (from the environment, as a deployment would); the builtin ``imagenet`` only."""
    root = tmp_path_factory.mktemp("secured")
    yield from serve(root / "store", root / "server.log", env={"REPSERVE_CLASSIFY_TOKEN": TOKEN})


@pytest.fixture
def browser(request, tmp_path) -> Iterator[webdriver.Chrome]:
    """Headless chromium; a screenshot of the last state goes to tests/artifacts/ whatever the outcome."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1500", "--no-first-run", "--disable-extensions", "--disable-sync",
                "--disable-background-networking", "--disable-component-update", "--lang=en-US",
                f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(WAIT_S)
        yield driver
    finally:
        try:
            screenshot(driver, request.node.name)
        finally:
            driver.quit()


def screenshot(driver, name: str) -> None:
    """The page as shown now, as ``tests/artifacts/<name>.png`` (the path is printed); never fails a test."""
    try:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / f"{name}.png"
        if driver.save_screenshot(str(shot)):
            print(f"screenshot: {shot}")
    except (OSError, WebDriverException) as e:
        print(f"no screenshot {name}: {e}")


def wait(driver, condition, what: str, timeout: float = WAIT_S):
    """``condition(driver)`` once truthy; on timeout an error naming ``what`` and the page's error message."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except TimeoutException:
        shown = driver.find_element(By.ID, "error")
        message = shown.text if shown.is_displayed() else "none"
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; the page's error: {message}") from None


def visible(driver, element_id: str) -> bool:
    return driver.find_element(By.ID, element_id).is_displayed()


def task_rows(driver) -> dict[str, list[str]]:
    """Cells of the tasks table by task name, as the user sees them (text)."""
    rows = {}
    for row in driver.find_elements(By.CSS_SELECTOR, "#tasks-body tr[data-task]"):
        rows[row.get_attribute("data-task")] = [c.text for c in row.find_elements(By.CSS_SELECTOR, "th, td")]
    return rows


def settled(driver) -> bool:
    """No classification in flight (the page marks the results busy while one is)."""
    return driver.find_element(By.ID, "results").get_attribute("aria-busy") is None


def choose_file(driver, path: Path) -> None:
    """Choose ``path`` as the only file, as the picker would (chromedriver adds to a ``multiple`` input's list:
    it is emptied first, without an event)."""
    files = driver.find_element(By.ID, "files")
    driver.execute_script("arguments[0].value = '';", files)
    files.send_keys(str(path))


def classify(driver, task: str, image: Path, top_k: int) -> list[tuple[str, float]]:
    """Set top-k, pick ``task`` (which classifies the images already chosen again), choose ``image`` and wait
    for its answer: ``[(label, score)]`` of the result, as the page shows them."""
    top = driver.find_element(By.ID, "top-k")
    top.clear()
    top.send_keys(str(top_k))
    Select(driver.find_element(By.ID, "task")).select_by_value(task)
    wait(driver, settled, f"the answer of {task} for the images chosen before")
    choose_file(driver, image)
    wait(driver, lambda d: settled(d) and d.find_elements(By.CSS_SELECTOR, "#results li.result.done"),
         f"the answer of {task} for {image.name}")
    results = driver.find_elements(By.CSS_SELECTOR, "#results li.result.done")
    assert [r.find_element(By.TAG_NAME, "h3").text for r in results] == [image.name]
    rows = results[0].find_elements(By.CSS_SELECTOR, ".prediction")
    return [(r.find_element(By.CSS_SELECTOR, ".label").text, float(r.get_attribute("data-score"))) for r in rows]


DROP = """
const dropped = new DataTransfer();
for (const [name, data] of arguments[0]) {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  dropped.items.add(new File([bytes], name, { type: "image/png" }));
}
const zone = document.getElementById("drop-zone");
for (const type of ["dragenter", "dragover", "drop"]) {
  zone.dispatchEvent(new DragEvent(type, { dataTransfer: dropped, bubbles: true, cancelable: true }));
}
"""


def drop(driver, *images: Path) -> list[list[tuple[str, float]]]:
    """Drop ``images`` on the drop zone (the events a user's drag makes) and wait for the answer: ``[(label,
    score)]`` per image."""
    driver.execute_script(DROP, [[p.name, base64.b64encode(p.read_bytes()).decode()] for p in images])
    wait(driver, lambda d: settled(d) and d.find_elements(By.CSS_SELECTOR, "#results li.result.done"),
         "the answer for the dropped images")
    results = driver.find_elements(By.CSS_SELECTOR, "#results li.result.done")
    assert [r.find_element(By.TAG_NAME, "h3").text for r in results] == [p.name for p in images]
    return [[(r.find_element(By.CSS_SELECTOR, ".label").text, float(r.get_attribute("data-score")))
             for r in result.find_elements(By.CSS_SELECTOR, ".prediction")] for result in results]


def console_errors(driver, *expected: str) -> list[str]:
    """Console errors (script errors, CSP violations, failed loads) other than failed requests of ``expected``
    statuses that the test caused."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"
            and not any(f"status of {status}" in e["message"] for status in expected)]


def test_classify_a_photo_on_an_open_server(open_server, browser, tmp_path):
    browser.get(f"{open_server.url}/")
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-tasks-loaded"), "the task list")
    assert not visible(browser, "token-section")  # an open server never asks for a token

    rows = task_rows(browser)
    assert set(rows) == {"imagenet", "markup"}
    name, labels, version, method, accuracy = rows["imagenet"]
    assert (name, version, accuracy) == ("imagenet", "0", "—")
    assert labels == "1000: tench, goldfish, great white shark, tiger shark, hammerhead, …"
    assert method == "pretrained built-in"
    name, labels, version, method, accuracy = rows["markup"]
    assert (version, method, accuracy) == ("1", "linear", "87.5%")
    assert labels == "6: " + ", ".join(MARKUP_LABELS[:5]) + ", …"  # the markup as text

    answer = classify(browser, "imagenet", CHELSEA, top_k=3)
    assert len(answer) == 3, answer
    assert answer[0][0] in CAT_LABELS, answer
    assert [s for _, s in answer] == sorted((s for _, s in answer), reverse=True)
    fills = browser.find_elements(By.CSS_SELECTOR, "#results .prediction .bar-fill")
    widths = [f.size["width"] for f in fills]
    assert len(widths) == 3
    assert widths[0] > 0
    assert widths == sorted(widths, reverse=True)
    result = browser.find_element(By.CSS_SELECTOR, "#results li.result.done")
    assert result.find_element(By.TAG_NAME, "h3").text == "chelsea.png"
    assert result.find_element(By.CSS_SELECTOR, "img.thumb").get_attribute("src").startswith("blob:")
    for element_id in ("latency-browser", "latency-server"):
        assert re.fullmatch(r"\d+(\.\d)? ms", browser.find_element(By.ID, element_id).text), element_id
    assert "imagenet v0" in browser.find_element(By.ID, "latency").text
    screenshot(browser, "try-it-page-chelsea")

    # Several images dropped at once: one request, one result each, in order.
    answers = drop(browser, CHELSEA, COFFEE)
    assert [len(a) for a in answers] == [3, 3]
    assert answers[0][0][0] in CAT_LABELS, answers
    assert "2 images dropped" in browser.find_element(By.ID, "file-summary").text

    # Labels from users are text: the markup task's answer shows them, and adds no element to the page.
    answer = classify(browser, "markup", CHELSEA, top_k=10)
    assert sorted(label for label, _ in answer) == sorted(MARKUP_LABELS)
    assert browser.find_elements(By.CSS_SELECTOR, "#results b, #tasks-body b, #tasks-body img") == []
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results img")) == 1  # the thumbnail only
    assert browser.title.startswith("RepServe")  # no onerror ran

    # An API error is shown with its JSON detail, not swallowed.
    fake = tmp_path / "not-an-image.png"
    fake.write_text("this is text, not a PNG")
    choose_file(browser, fake)
    wait(browser, lambda d: settled(d) and visible(d, "error"), "the error message")
    shown = browser.find_element(By.ID, "error").text
    assert re.match(r"415 unsupported_media: .*not-an-image\.png.*not a decodable image", shown), shown
    assert browser.find_elements(By.CSS_SELECTOR, "#results li.result") == []
    assert console_errors(browser, "415") == []


def test_a_token_server_asks_for_the_token(secured_server, browser):
    browser.get(f"{secured_server.url}/")
    wait(browser, lambda d: visible(d, "token-section"), "the token field")
    reason = browser.find_element(By.ID, "token-reason").text
    assert re.fullmatch(r"This server needs a token: 401 unauthorized: .*Bearer.*", reason), reason
    assert browser.switch_to.active_element == browser.find_element(By.ID, "token")  # focus on the field

    token = browser.find_element(By.ID, "token")
    token.send_keys("wrong-token-0123456789abcdef")
    browser.find_element(By.ID, "token-use").click()
    wait(browser, lambda d: "403 forbidden" in d.find_element(By.ID, "token-reason").text, "the refusal")

    token.clear()
    token.send_keys(TOKEN)
    browser.find_element(By.ID, "token-use").click()
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-tasks-loaded"), "the task list")
    assert not visible(browser, "error")
    assert set(task_rows(browser)) == {"imagenet"}

    answer = classify(browser, "imagenet", CHELSEA, top_k=5)
    assert answer[0][0] in CAT_LABELS, answer
    assert console_errors(browser, "401", "403") == []
