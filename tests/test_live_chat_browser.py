"""The live chat page in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by
Selenium; nothing is downloaded): a message, a follow-up, and the update it causes shown on the page.

Skips where the browser or its driver is not installed. ``LIVE_CHAT_SCREENSHOT=path.png`` keeps the
screenshot (it is always saved under the test's tmp folder).
"""

import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch

pytest.importorskip("gradio")
pytest.importorskip("selenium")

from sdpo.live_chat.sessions import INITIAL  # noqa: E402
from sdpo.live_chat.ui import build_app, launch_app  # noqa: E402
from tests.test_live_chat import PROMPT, adapter_weights, start_engine  # noqa: E402, F401  (fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
    ),
]
FINGERPRINT = re.compile(r"adapter\s+([0-9a-f]{8})")
WAIT_SECONDS = 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900", "--lang=en"):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture()
def page_url(start_engine, monkeypatch):  # noqa: F811
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    engine = start_engine()
    app = build_app(engine)
    url = launch_app(app, host="127.0.0.1", port=free_port(), block=False)
    yield url, engine
    app.close()


def test_a_follow_up_in_the_browser_updates_the_users_adapter(browser, page_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, engine = page_url
    assert url.startswith("http://127.0.0.1:")
    browser.get(url)
    wait = WebDriverWait(browser, WAIT_SECONDS)

    def field(elem_id):
        return wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input"))

    def status_text_when(condition):
        return wait.until(lambda d: (text := d.find_element(By.ID, "status").text) and condition(text) and text)

    field("user-name").send_keys("alice")
    browser.find_element(By.ID, "load-user").click()
    before = status_text_when(lambda text: "alice" in text and "adapter step 0" in text)
    assert FINGERPRINT.search(before), before
    initial = FINGERPRINT.search(before).group(1)
    assert initial == engine.initial_fingerprint

    field("message").send_keys(PROMPT + Keys.ENTER)
    status_text_when(lambda text: "replies: 1" in text)
    field("message").send_keys("Much shorter, please." + Keys.ENTER)
    after = status_text_when(lambda text: "adapter step 1" in text and "replies: 2" in text and "queued" not in text)
    wait.until(lambda d: d.find_element(By.ID, "metric-step").text == "1")

    assert FINGERPRINT.search(after).group(1) == engine.status("alice").fingerprint != initial
    trained, fresh = adapter_weights(engine.adapter_path("alice")), adapter_weights(engine.root / INITIAL)
    assert any(not torch.equal(trained[k], fresh[k]) for k in trained)
    tokens = browser.find_elements(By.CSS_SELECTOR, "#signal-panel .tokens span")
    assert len(tokens) == len(engine.status("alice").last_update.tokens) > 0
    assert "Much shorter, please." in browser.find_element(By.ID, "signal-panel").text

    screenshot = tmp_path / "live_chat.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("LIVE_CHAT_SCREENSHOT"):
        shutil.copyfile(screenshot, Path(os.environ["LIVE_CHAT_SCREENSHOT"]))
