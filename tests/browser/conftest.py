"""A stack of its own (dev Outpost, bridge, JupyterHub on the run's RabbitMQ) and a headless
Chromium for the browser test, with a screenshot and the page source kept when a test fails."""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.wait import WebDriverWait

from tests.integration.services import AMQP_URL, Bridge, Hub, Outpost, port_open

T = TypeVar("T")

DEMO_PASSWORD = "browser-demo"
"""The login form's password for every user of this hub (deploy/jupyterhub_config.py's DEMO_PASSWORD)."""
START_DELAY = 3
"""Seconds the dev Outpost holds every start (its ``dev_start_delay`` user option): the spawn
page then shows our events for at least that long before it moves on to JupyterLab, however
fast the machine is."""
WAIT = 90
"""Seconds any one step may take: JupyterLab's first load (bundles, extensions, a kernel) on a
busy two-core machine takes tens of seconds."""


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Logs of the hub, bridge, Outpost and chromedriver; the users' HOME directories."""
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="session")
def outpost(workdir: Path) -> Iterator[Outpost]:
    outpost = Outpost(workdir, "hubtest:outpost-secret")
    # The notebooks the test creates land in the pytest tmp dir, not in the shared default /tmp/dev-outpost-homes.
    outpost.argv += ["--home-root", str(workdir / "homes")]
    yield outpost.start()
    outpost.stop()


@pytest.fixture(scope="session")
def hub(workdir: Path, outpost: Outpost) -> Iterator[Hub]:
    """JupyterHub with a bridge, apart from the integration tests' stack (whose tests restart
    hubs and stop Outposts)."""
    # `./dev test` starts RabbitMQ and installs configurable-http-proxy; without them this is a setup error.
    assert port_open(5672), f"RabbitMQ is not listening at {AMQP_URL}: run the tests with ./dev test"
    assert shutil.which("configurable-http-proxy"), "configurable-http-proxy missing: run ./dev test"
    prefix = f"browser-{uuid.uuid4().hex[:8]}"
    # Status every second: the Outposts page shows the Outpost soon after the first command.
    bridge = Bridge(workdir, prefix, workdir / "journal.sqlite", ["--OutpostBridge.status_interval=1"])
    extra = {"OutpostSpawner": {"custom_user_options": {"dev_start_delay": START_DELAY}}}
    hub = Hub(
        workdir,
        workdir / "hub",
        prefix,
        outpost,
        env={
            "DEMO_PASSWORD": DEMO_PASSWORD,
            "OUTPOST_MQ_EXTRA_CONFIG": json.dumps(extra),
            "OUTPOST_MQ_START_TIMEOUT": str(WAIT),
        },
    )
    try:
        bridge.start()
        yield hub.start()
    finally:
        hub.stop()
        bridge.stop()


class Browser:
    """A headless Chromium session with explicit waits and the hub's address."""

    def __init__(self, driver: WebDriver, hub_url: str, artifacts: Path) -> None:
        self.driver, self.hub_url, self.artifacts = driver, hub_url, artifacts

    def get(self, path: str) -> None:
        self.driver.get(self.hub_url + path)

    def wait(self, condition: Callable[[WebDriver], T], what: str, timeout: float = WAIT) -> T:
        """The first truthy value of ``condition`` (polled every 0.2 s), or a TimeoutException naming ``what``."""
        message = f"waited {timeout} s for {what} (at {self.driver.current_url})"
        return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(condition, message)

    def save(self, name: str) -> list[Path]:
        """A screenshot and the page source in :attr:`artifacts`."""
        self.artifacts.mkdir(parents=True, exist_ok=True)
        screenshot, source = self.artifacts / f"{name}.png", self.artifacts / f"{name}.html"
        self.driver.save_screenshot(str(screenshot))
        source.write_text(f"<!-- {self.driver.current_url} -->\n{self.driver.page_source}")
        return [screenshot, source]


@pytest.fixture
def browser(hub: Hub, workdir: Path, tmp_path: Path) -> Iterator[Browser]:
    """A fresh Chromium (its own profile, so no cookie of an earlier test) for one test."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    # `./dev test` installs Debian's chromium and chromium-driver: missing, the run is set up wrong.
    assert chromium and chromedriver, "chromium or chromedriver missing: run the tests with ./dev test"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--disable-gpu",
        # Chromium's sandbox refuses to run as root and needs user namespaces containers seldom have.
        "--no-sandbox",
        # Docker's /dev/shm is 64 MB, too small for JupyterLab's renderer.
        "--disable-dev-shm-usage",
        "--no-proxy-server",
        "--no-first-run",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(argument)
    # With the driver's path given, Selenium never runs Selenium Manager (which would download one).
    service = Service(executable_path=chromedriver, log_output=str(workdir / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT)
    try:
        yield Browser(driver, hub.url, tmp_path / "failure")
    finally:
        driver.quit()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, Any]:
    """On a failed test, keep what the browser showed and name the files in the report."""
    report = yield
    browser = getattr(item, "funcargs", {}).get("browser")
    if report.when == "call" and report.failed and isinstance(browser, Browser):
        try:
            saved = "\n".join(str(p) for p in browser.save(item.name))
        except Exception as exc:  # the browser itself may be what failed
            saved = f"could not save the page: {exc!r}"
        logs = item.funcargs["workdir"]
        text = f"{saved}\nlogs of the hub, bridge, Outpost and chromedriver: {logs}"
        report.sections.append(("browser artifacts", text))
        print(f"\nbrowser artifacts of {item.nodeid}:\n{text}", file=sys.stderr)
    return report
