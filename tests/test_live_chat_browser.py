"""The live chat page in real headless Chromium browsers (Debian's ``chromium`` + ``chromium-driver``, driven by
Selenium; nothing is downloaded): two people log in; one chats, follows up and sees the update it causes (the
panel shows the update's own A_t); the other sees and changes only their own adapter.

Skips where the browser or its driver is not installed. ``LIVE_CHAT_SCREENSHOT=path.png`` keeps the
screenshot (it is always saved under the test's tmp folder).
"""

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("gradio")
pytest.importorskip("selenium")

from sdpo.live_chat.accounts import Accounts
from sdpo.live_chat.api import Identities
from sdpo.live_chat.sessions import INITIAL
from sdpo.live_chat.ui import build_app, launch_app
from sdpo.utils.network import free_port
from tests.test_live_chat import PROMPT, adapter_weights, start_engine  # noqa: F401  (fixture)

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


PASSWORDS = {"alice": "alice-password", "bob": "bob-password"}


@pytest.fixture()
def second_browser(browser):
    """Another browser with its own cookies (a second person)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900", "--lang=en"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture()
def page_url(start_engine, monkeypatch, tmp_path):  # noqa: F811
    """(URL, engine, accounts) of the page behind a login with accounts alice and bob."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    accounts = Accounts(tmp_path / "accounts.json")
    for name, password in PASSWORDS.items():
        accounts.add(name, password)
    engine = start_engine()
    identities = Identities(accounts)
    app = build_app(engine, identities)
    url = launch_app(app, engine, identities, host="127.0.0.1", port=free_port(), block=False)
    yield url, engine, accounts
    app.close()


class Page:
    """One person's browser on the live chat page."""

    def __init__(self, driver, url):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.url = driver, url
        self.wait = WebDriverWait(driver, WAIT_SECONDS)

    def log_in(self, name: str, password: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        self.driver.get(self.url)
        secret = self.wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[type='password']"))
        login = self.driver.find_element(By.CSS_SELECTOR, "input[type='text'], input:not([type])")
        login.send_keys(name)
        secret.send_keys(password + Keys.ENTER)
        self.status_when(lambda text: "adapter step" in text)

    def field(self, elem_id):
        from selenium.webdriver.common.by import By

        return self.wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input"))

    def click(self, elem_id):
        from selenium.webdriver.common.by import By

        self.driver.find_element(By.ID, elem_id).click()

    def status_when(self, condition):
        from selenium.webdriver.common.by import By

        return self.wait.until(lambda d: (text := d.find_element(By.ID, "status").text) and condition(text) and text)

    def send(self, text):
        from selenium.webdriver.common.keys import Keys

        self.field("message").send_keys(text + Keys.ENTER)


def test_two_logged_in_users_each_see_and_change_only_their_own_adapter(browser, second_browser, page_url, tmp_path):
    from selenium.webdriver.common.by import By

    url, engine, accounts = page_url
    assert url.startswith("http://127.0.0.1:")
    alice_id, bob_id = accounts.find("alice").id, accounts.find("bob").id
    alice, bob = Page(browser, url), Page(second_browser, url)

    browser.get(url)  # not logged in: no chat, only the login form
    alice.wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type='password']"))
    assert not browser.find_elements(By.ID, "chat")

    alice.log_in("alice", PASSWORDS["alice"])
    before = alice.status_when(lambda text: "alice" in text and "adapter step 0" in text)
    assert FINGERPRINT.search(before).group(1) == engine.initial_fingerprint
    assert "512 tokens" in browser.find_element(By.ID, "limits").text
    alice.send(PROMPT)
    alice.status_when(lambda text: "replies: 1" in text)
    alice.send("Much shorter, please.")
    after = alice.status_when(lambda text: "adapter step 1" in text and "replies: 2" in text and "queued" not in text)
    alice.wait.until(lambda d: d.find_element(By.ID, "metric-step").text == "1")
    assert FINGERPRINT.search(after).group(1) == engine.status(alice_id).fingerprint != engine.initial_fingerprint
    tokens = browser.find_elements(By.CSS_SELECTOR, "#signal-panel .tokens span")
    panel = engine.status(alice_id).last_update
    assert [float(t.get_attribute("title")) for t in tokens] == pytest.approx(panel.signal, abs=1e-3)
    trained, fresh = adapter_weights(engine.adapter_path(alice_id)), adapter_weights(engine.root / INITIAL)
    assert any(not torch.equal(trained[k], fresh[k]) for k in trained)

    # Bob, logged in at the same time, sees his own fresh adapter and nothing of alice's.
    bob.log_in("bob", PASSWORDS["bob"])
    seen = bob.status_when(lambda text: "bob" in text and "adapter step 0" in text)
    assert FINGERPRINT.search(seen).group(1) == engine.initial_fingerprint
    assert "no update yet" in second_browser.find_element(By.ID, "signal-panel").text
    assert "Much shorter" not in second_browser.page_source and PROMPT not in second_browser.page_source
    # Bob's reset and undo change only bob's adapter.
    bob.click("reset")
    bob.status_when(lambda text: "reset to the initial adapter" in text)
    bob.click("undo")
    assert engine.wait_until_idle(timeout=WAIT_SECONDS)
    assert engine.status(alice_id).step == 1 and engine.status(alice_id).fingerprint == FINGERPRINT.search(after).group(
        1
    )
    assert engine.status(bob_id).step == 0 and engine.applied_updates(bob_id) == []
    alice.status_when(lambda text: "adapter step 1" in text)

    screenshot = tmp_path / "live_chat.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("LIVE_CHAT_SCREENSHOT"):
        shutil.copyfile(screenshot, Path(os.environ["LIVE_CHAT_SCREENSHOT"]))
