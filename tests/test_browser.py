"""The chat page in a real headless browser: Chromium from the system's packages, driven by
selenium. It types a prompt, waits for the streamed answer (which must be what the API gives
for the same request) and watches the memory panel update."""

from __future__ import annotations

import os
import shutil

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.test_serve import MODEL, Server, tiny_chat  # noqa: E402, F401  (tiny_chat: a fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="Chromium and its driver are not installed (Debian: apt-get install -y chromium chromium-driver)")


@pytest.fixture(scope="module")
def page_server(tiny_chat):  # noqa: F811
    s = Server(tiny_chat, "--slots", "2")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


def test_the_page_streams_an_answer_and_shows_the_memory(page_server, browser):
    browser.get(page_server.base + "/")
    wait = WebDriverWait(browser, 60)
    panel = browser.find_element(By.ID, "memory")
    wait.until(lambda d: int(panel.get_attribute("data-updates")) >= 1)
    assert browser.find_element(By.ID, "slots").text == "0 / 2"
    assert browser.find_element(By.ID, "mem-resident").text.endswith("iB")
    tokens_before = int(browser.find_element(By.ID, "tokens").text)

    for field, value in (("temperature", "0"), ("max-tokens", "24")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "prompt").send_keys("What does the with statement do?")
    browser.find_element(By.ID, "send").click()
    answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant[data-done='true']"))
    assert browser.find_element(By.ID, "error").text == ""

    expected = page_server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What does the with statement do?"}],
        temperature=0, top_p=0.9, max_tokens=24)
    # the page shows the text as the DOM holds it (white-space: pre-wrap keeps every character)
    assert answer.get_attribute("textContent") == expected.choices[0].message.content
    assert answer.get_attribute("data-finish") == expected.choices[0].finish_reason
    # the panel goes on updating, and counts the tokens of the answer
    wait.until(lambda d: int(d.find_element(By.ID, "tokens").text) >= tokens_before
               + expected.usage.completion_tokens)
    updates = int(panel.get_attribute("data-updates"))
    wait.until(lambda d: int(panel.get_attribute("data-updates")) > updates)
    shot = os.environ.get("MEMLM_PAGE_SCREENSHOT")
    if shot:
        browser.save_screenshot(shot)
