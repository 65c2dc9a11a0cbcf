"""The admin end to end in real headless Chromium (Debian's chromium + chromedriver, Selenium).

A live server on 127.0.0.1 serves the admin (and its static files) from this process; the
browser logs in, opens a machine's state, reads its JSON, and releases its lock with the
admin action. The run on SQLite saves the screenshots docs/operating.md shows
(docs/screenshots/*.png). Without Chromium the test is skipped locally, and fails under CI.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import pytest
from django.contrib.auth.models import User
from django.contrib.staticfiles.handlers import StaticFilesHandler
from django.test import override_settings
from django.test.testcases import LiveServerThread

from machine_memory import MachineMemory
from machine_memory.models import MachineLock
from tests.support import in_ci, new_id

if TYPE_CHECKING:
    from collections.abc import Iterator

SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# No network beyond the live server, no background traffic, a profile of its own.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1680,900",
]


def browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists() and not shutil.which(Path(path).name):
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture
def browser() -> Iterator[Any]:
    reason = browser_missing()
    if reason is not None:
        if in_ci():
            pytest.fail(f"CI is set and the browser test cannot run: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="mm-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        service = Service(shutil.which("chromedriver") or CHROMEDRIVER)
        driver = webdriver.Chrome(service=service, options=options)
        driver.set_page_load_timeout(30)
        # A click returns before the next page has loaded: lookups wait for their element.
        driver.implicitly_wait(10)
        try:
            yield driver
        finally:
            driver.quit()


@pytest.fixture
def server(db_access: None) -> Iterator[str]:
    """The admin served on 127.0.0.1 by Django's live-server thread, static files included."""
    thread = LiveServerThread("127.0.0.1", StaticFilesHandler, connections_override={}, port=0)
    thread.daemon = True
    thread.start()
    thread.is_ready.wait()
    if thread.error:
        raise thread.error
    try:
        yield f"http://127.0.0.1:{thread.port}"
    finally:
        thread.terminate()
        thread.join(timeout=10)


def test_admin_in_chromium(alias: str, server: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    screenshots = alias == "default"  # one set of pictures, from the SQLite run
    tag = new_id("")[-6:]
    workflow = f"arvo.orc.order/{tag}+root=="
    machine_id = f"arvo.orc.payment/{tag}+child=="
    document = {
        "executionStatus": "active",
        "subject": machine_id,
        "parentSubject": workflow,
        "source": "arvo.orc.payment",
        "initiator": "com.shop.checkout",
        "value": {"order": "A-1001", "amount": 42.5, "currency": "EUR", "note": "<b>not html</b>"},
        "consumed": ["com.payment.requested", "com.payment.authorised"],
    }
    worker = MachineMemory(using=alias, owner=f"worker-7:{tag}")
    worker.write(workflow, {"executionStatus": "active", "source": "arvo.orc.order"}, None)
    worker.write(machine_id, document, None)
    shipping = f"arvo.orc.shipping/{tag}+child=="
    worker.write(
        shipping,
        {"executionStatus": "done", "parentSubject": workflow, "source": "arvo.orc.shipping"},
        None,
    )
    assert worker.lock(shipping)  # an earlier event's lock, released: "expired"
    assert worker.unlock(shipping)
    assert worker.lock(machine_id, ttl=300)
    password = "correct horse battery staple"
    username = f"ops-{tag}"
    User.objects.create_superuser(username, password=password)

    def shot(name: str) -> None:
        if not screenshots:
            return
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        # The whole page, not just the first screenful.
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1680, min(max(int(height), 600), 2400))
        browser.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
        browser.set_window_size(1680, 900)

    # ALLOWED_HOSTS: what LiveServerTestCase adds for its own server.
    with override_settings(MACHINE_MEMORY={"DATABASE": alias}, ALLOWED_HOSTS=["127.0.0.1"]):
        # Log in.
        browser.get(f"{server}/admin/login/?next=/admin/")
        browser.find_element(By.NAME, "username").send_keys(username)
        browser.find_element(By.NAME, "password").send_keys(password)
        browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
        WebDriverWait(browser, 10).until(lambda driver: "Site administration" in driver.title)

        # The list: the machines, the payment's lock live and held by the worker.
        browser.get(f"{server}/admin/machine_memory/machinestate/")
        # Fold the navigation sidebar away (remembered by the browser): room for the columns.
        browser.find_element(By.ID, "toggle-nav-sidebar").click()
        search = browser.find_element(By.ID, "searchbar")
        search.send_keys("arvo.orc.*")
        search.submit()
        WebDriverWait(browser, 10).until(lambda driver: "?q=" in driver.current_url)
        rows = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
        row = next(r for r in rows if machine_id in r.text)
        assert f"live ({worker.owner})" in row.text
        shot("admin-states")

        # The state page: the document as pretty JSON, the lock, the parent link.
        row.find_element(By.CSS_SELECTOR, "th a").click()
        pre = browser.find_element(By.CSS_SELECTOR, "pre.machine-memory-state")
        assert json.loads(pre.text) == document
        assert '"amount": 42.5' in pre.text  # indented, one key per line
        page = browser.find_element(By.ID, "content").text
        assert "live, " in page and worker.owner in page
        assert browser.find_element(By.LINK_TEXT, workflow)
        shot("admin-state")

        # Release the lock with the admin action.
        browser.get(f"{server}/admin/machine_memory/machinestate/")
        search = browser.find_element(By.ID, "searchbar")
        search.send_keys(machine_id)
        search.submit()
        WebDriverWait(browser, 10).until(lambda driver: "?q=" in driver.current_url)
        browser.find_element(By.CSS_SELECTOR, "input.action-select").click()
        Select(browser.find_element(By.NAME, "action")).select_by_value("release_locks")
        browser.find_element(By.CSS_SELECTOR, "button[name=index]").click()
        message = browser.find_element(By.CSS_SELECTOR, "ul.messagelist li.success").text
        assert f"Released 1 lock(s): {machine_id} (held by {worker.owner}" in message
        assert worker.lock_info(machine_id) is None
        assert f"expired ({worker.owner})" in browser.find_element(By.ID, "result_list").text
        shot("admin-released")

        # The lock list: the released lock, expired, with its token.
        browser.get(f"{server}/admin/machine_memory/machinelock/?{urlencode({'q': machine_id})}")
        table = browser.find_element(By.ID, "result_list").text
        lock = MachineLock.objects.using(alias).get(pk=machine_id)
        assert worker.owner in table and str(lock.token) in table and "expired" in table
        shot("admin-locks")
