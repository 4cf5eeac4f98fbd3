"""The web chat page at /, driven in headless Chromium through Selenium against a live server.

Needs Debian's `chromium` and `chromium-driver` (scripts/ci-browser.sh installs them) and the
`selenium` package; without them the tests skip and say which is missing. The model is the tiny
scripted one from test_serving, slowed to ~0.1 s per forward so a stream can be watched and stopped.
"""

from __future__ import annotations

import shutil
import tempfile
import time

import pytest
from test_serving import ANSWER, REASONING, build_model_dir, live_server, wait_for

from seekling.server import create_app
from seekling.serving import Engine, load_for_serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
    SELENIUM = True
except ImportError:
    SELENIUM = False

missing = [name for name, ok in (("chromium", CHROMIUM), ("chromedriver (chromium-driver)", CHROMEDRIVER),
                                 ("the selenium package", SELENIUM)) if not ok]
pytestmark = [pytest.mark.skipif(bool(missing), reason=f"browser test needs {', '.join(missing)}: "
                                                       "run scripts/ci-browser.sh"),
              pytest.mark.usefixtures("one_thread")]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1000,800"]


class SlowDecoder:
    """The engine's decode step with a pause before each token, so a human-speed stream can be watched."""

    def __init__(self, decoder, delay: float):
        self.decoder, self.delay = decoder, delay

    def step(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.decoder.step(*args, **kwargs)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model, tok, _ = load_for_serving(build_model_dir(str(tmp_path_factory.mktemp("web") / "tiny")))
    engine = Engine(model, tok, max_concurrent=2)
    engine.decoder.step_fn = SlowDecoder(engine.decoder.step_fn, 0.1)
    with live_server(create_app(engine, tok, "tiny-scripted")) as url:
        yield url, engine


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="seekling-chromium-")
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_until(driver, condition, timeout: float = 15):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def test_type_a_message_and_watch_the_answer_stream_with_folded_thinking(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, _ = server
    browser.get(url + "/")
    wait_until(browser, lambda d: d.find_element(By.ID, "model").text == "tiny-scripted")
    browser.find_element(By.ID, "prompt").send_keys("What is 2+2?", Keys.ENTER)
    details = wait_until(browser, lambda d: d.find_element(By.CSS_SELECTOR, ".assistant details.thinking"))
    # while the model thinks, the fold is open and fills up token by token
    partial = wait_until(browser, lambda d: d.find_element(By.CSS_SELECTOR, ".assistant .reasoning").text or False)
    assert REASONING.startswith(partial) and partial != REASONING
    assert browser.find_element(By.ID, "send").text == "Stop"
    wait_until(browser, lambda d: "tok/s" in d.find_element(By.CSS_SELECTOR, ".assistant .meta").text)
    assert browser.find_element(By.CSS_SELECTOR, ".assistant .answer").text == ANSWER
    assert browser.find_element(By.CSS_SELECTOR, ".user .bubble").text == "What is 2+2?"
    # once the answer starts, the thinking folds away behind its summary; a click opens it
    assert details.is_displayed() and details.get_attribute("open") is None
    assert "Thought for" in details.find_element(By.TAG_NAME, "summary").text
    details.find_element(By.TAG_NAME, "summary").click()
    assert details.get_attribute("open") is not None
    assert details.find_element(By.CLASS_NAME, "reasoning").text == REASONING
    assert browser.find_element(By.ID, "send").text == "Send"


def test_stop_aborts_the_stream_and_frees_the_slot(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, engine = server
    browser.get(url + "/")
    cancelled = engine.counters["finished_cancelled"]
    browser.find_element(By.ID, "prompt").send_keys("Think about it", Keys.ENTER)
    wait_until(browser, lambda d: d.find_element(By.CSS_SELECTOR, ".assistant .reasoning").text or False)
    browser.find_element(By.ID, "send").click()  # the button reads Stop while streaming
    wait_until(browser, lambda d: d.find_element(By.CSS_SELECTOR, ".assistant .meta").text == "stopped")
    assert browser.find_element(By.ID, "send").text == "Send"
    assert browser.find_element(By.CSS_SELECTOR, ".assistant .answer").text == ""
    assert wait_for(lambda: engine.counters["finished_cancelled"] == cancelled + 1, 3)
    assert engine.stats()["active"] == 0
