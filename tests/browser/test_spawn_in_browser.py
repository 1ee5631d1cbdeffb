"""The hub's pages and JupyterLab in a real headless Chromium (issue 14, item 7): log in through
the form, start the default server from the home page, watch the spawn page show our progress,
run a notebook cell in JupyterLab, stop the server from the home page, and start a named server
from there until its JupyterLab loads."""

from __future__ import annotations

import os
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec

from tests.integration.services import Hub, Outpost, new_user, wait_for

from .conftest import DEMO_PASSWORD, WAIT, Browser

# Setup (hub, bridge, Outpost) plus two server starts and JupyterLab's loads, on a busy machine.
pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.timeout(600)]

OUR_EVENTS = (
    "Sending request to Outpost service to start your service.",
    "Outpost communication successful.",
    "Server started; waiting for it to answer",
)
"""What the spawner (spawner/progress.py) says on the spawn page; JupyterHub's own first event is
"Server requested"."""


def new_user_name() -> str:
    return f"browser{uuid.uuid4().hex[:8]}"


def log_in(browser: Browser, user: str) -> None:
    """Through the login form, to the home page (JupyterHub would otherwise start the default
    server right after the login)."""
    browser.get("/hub/login?next=%2Fhub%2Fhome")
    browser.wait(ec.visibility_of_element_located((By.ID, "username_input")), "the login form").send_keys(user)
    browser.driver.find_element(By.ID, "password_input").send_keys(DEMO_PASSWORD)
    browser.driver.find_element(By.ID, "login_submit").click()
    browser.wait(lambda d: urlsplit(d.current_url).path == "/hub/home", "the home page after the login")
    browser.wait(ec.visibility_of_element_located((By.ID, "start")), "the home page's start button")


def progress_seen(driver: WebDriver) -> tuple[int, str] | None:
    """The spawn page's bar value and the first of our events in its log, once both are there."""
    state: dict[str, Any] = driver.execute_script(
        "const bar = document.getElementById('progress-bar');"
        "const log = document.getElementById('progress-log');"
        "return {value: bar && bar.getAttribute('aria-valuenow'), log: log ? log.textContent : ''};"
    )
    shown = [event for event in OUR_EVENTS if event in state["log"]]
    if state["value"] is None or not shown:
        return None
    return int(float(state["value"])), shown[0]


def lab_loaded(browser: Browser, server_path: str) -> None:
    """JupyterLab of ``server_path`` (``/user/alice/``) shows its launcher."""
    browser.wait(ec.url_contains(f"{server_path}lab"), f"JupyterLab at {server_path}")
    browser.wait(
        ec.visibility_of_element_located((By.CSS_SELECTOR, ".jp-LauncherCard[data-category='Notebook']")),
        f"JupyterLab's launcher at {server_path}",
    )


def run_a_cell(browser: Browser) -> str:
    """A new notebook from the launcher; ``print(6*7)`` run in its first cell; the cell's output."""
    browser.driver.find_element(By.CSS_SELECTOR, ".jp-LauncherCard[data-category='Notebook']").click()
    panel = ".jp-NotebookPanel:not(.lm-mod-hidden)"
    # The status bar says "Idle" only once the kernel is connected (the toolbar's indicator
    # starts at "idle" before that, and a cell run then is dropped without a word).
    kernel_status = (By.CSS_SELECTOR, ".jp-StatusBar-Item .jp-StatusBar-TextItem[title^='Change kernel']")
    browser.wait(ec.text_to_be_present_in_element(kernel_status, "| Idle"), "the notebook's kernel to be idle")
    editor = browser.wait(
        ec.element_to_be_clickable((By.CSS_SELECTOR, f"{panel} .jp-Cell .cm-content")), "the first cell's editor"
    )
    editor.click()
    editor.send_keys("print(6*7)")
    editor.send_keys(Keys.SHIFT, Keys.ENTER)
    output: WebElement = browser.wait(
        ec.visibility_of_element_located((By.CSS_SELECTOR, f"{panel} .jp-OutputArea-output")), "the cell's output"
    )
    return str(output.text).strip()


def outpost_services(outpost: Outpost, user: str) -> list[dict[str, Any]]:
    return [s for s in outpost.get("/services/") if s["name"].startswith(user)]


def test_default_server_from_the_login_form_to_a_notebook_cell_and_back(
    browser: Browser, hub: Hub, outpost: Outpost
) -> None:
    user = new_user_name()
    log_in(browser, user)

    browser.driver.find_element(By.ID, "start").click()
    browser.wait(ec.url_contains(f"/hub/spawn-pending/{user}"), "the spawn page")
    value, event = browser.wait(progress_seen, "the spawn page to show one of our events")
    assert value > 0, f"the progress bar stayed at {value} after {event!r}"

    lab_loaded(browser, f"/user/{user}/")
    assert run_a_cell(browser) == "42"

    browser.get("/hub/home")
    browser.wait(ec.element_to_be_clickable((By.ID, "stop")), "the home page's stop button").click()
    browser.wait(ec.invisibility_of_element_located((By.ID, "stop")), "the stop button to go")
    browser.wait(ec.text_to_be_present_in_element((By.ID, "start"), "Start My Server"), "the start button back")
    wait_for(lambda: hub.server_model(user) is None, WAIT, "the hub to record the server stopped")
    wait_for(lambda: outpost_services(outpost, user) == [], WAIT, "the Outpost to stop the server")


def test_named_server_from_the_home_page(browser: Browser, hub: Hub, outpost: Outpost) -> None:
    user, name = new_user_name(), "second"
    log_in(browser, user)

    browser.driver.find_element(By.CSS_SELECTOR, ".new-server-name").send_keys(name)
    browser.driver.find_element(By.CSS_SELECTOR, ".new-server-btn").click()
    # JupyterHub 5 goes to the spawn page at once; JupyterHub 6 creates the server (not started)
    # and reloads the home page, where its row has a start button.
    start = (By.ID, f"start-{name}")
    browser.wait(
        lambda d: urlsplit(d.current_url).path != "/hub/home" or ec.visibility_of_element_located(start)(d),
        "the spawn page or the new server's start button",
    )
    if urlsplit(browser.driver.current_url).path == "/hub/home":
        browser.driver.find_element(*start).click()
    browser.wait(ec.url_contains(f"/hub/spawn-pending/{user}/{name}"), "the spawn page")
    browser.wait(progress_seen, "the spawn page to show one of our events")
    lab_loaded(browser, f"/user/{user}/{name}/")
    assert hub.server_model(user, name)["ready"]

    browser.get("/hub/home")
    link = (By.CSS_SELECTOR, f"tr[data-server-name='{name}'] a.server-link")
    browser.wait(ec.visibility_of_element_located(link), "the server's link")
    browser.driver.find_element(By.ID, f"stop-{name}").click()
    browser.wait(ec.visibility_of_element_located(start), "the server's start button back")
    wait_for(lambda: hub.server_model(user, name) is None, WAIT, "the hub to record the server stopped")
    wait_for(lambda: outpost_services(outpost, user) == [], WAIT, "the Outpost to stop the server")


def test_an_admin_finds_the_outpost_on_the_outposts_page(browser: Browser, hub: Hub, outpost: Outpost) -> None:
    """After a start (the bridge serves the Outpost from the first command on), the admin's
    Outposts page lists it with a closed circuit and the bridge that serves it, and the page's
    own refresh keeps it current."""
    user = new_user(hub, "browser")
    assert hub.api("POST", hub.server_path(user), json={}).status_code in (201, 202)  # a user's server
    wait_for(lambda: (hub.server_model(user) or {}).get("ready"), WAIT, "the user's server")
    log_in(browser, "admin")
    browser.get("/hub/outposts")
    origin = f"http://127.0.0.1:{outpost.port}"
    rows = (By.ID, "outposts-rows")
    browser.wait(ec.text_to_be_present_in_element(rows, origin), "the Outpost on the page")
    updated = browser.driver.find_element(By.ID, "outposts-updated").text
    browser.wait(lambda d: d.find_element(By.ID, "outposts-updated").text != updated, "the page's own refresh")
    row = browser.driver.find_element(By.CSS_SELECTOR, "#outposts-rows tr[data-key]")
    assert "closed" in row.text and origin in row.text, row.text
    assert "0 / 0" in row.text, row.text  # orphans found / stopped
    if os.environ.get("OUTPOST_MQ_DOCS_SCREENSHOT"):  # docs/outposts-page.png is made this way
        browser.driver.set_window_size(1400, 700)
        browser.driver.save_screenshot(os.environ["OUTPOST_MQ_DOCS_SCREENSHOT"])
    hub.api("DELETE", hub.server_path(user))
