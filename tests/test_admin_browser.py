"""The admin end to end in real headless Chromium (Debian's chromium + chromedriver, Selenium).

The example project's ``manage.py demo`` fills the database under test, and a machine is
locked through the REST API. A live server on 127.0.0.1 serves the admin (and its static
files) from this process; the browser logs in, opens a machine's state, reads its JSON and
releases its lock with the admin action; at 1366 and 1440 pixels wide no page scrolls
sideways or clips a column, with the longest ids and owners. The run on SQLite takes the
screenshots docs/operating.md shows: into the test's temporary directory, or with
``MM_SCREENSHOTS=docs/screenshots`` into the docs (a run never writes into the checkout
unasked: CI runs the suite twice at once). Without Chromium the test is skipped locally,
and fails under CI.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest
from django.contrib import admin
from django.contrib.admin.utils import quote as admin_quote
from django.contrib.auth.models import User
from django.contrib.staticfiles.handlers import StaticFilesHandler
from django.db import connections
from django.test import override_settings
from django.test.testcases import LiveServerThread
from django.urls import include, path

from machine_memory import MachineMemory
from machine_memory.contrib.rest_framework import quote_id
from machine_memory.models import MachineLock, MachineState
from machine_memory.validation import MAX_ID_LENGTH, MAX_OWNER_LENGTH, METADATA_LENGTHS
from tests.support import in_ci, new_id

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent
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
    "--window-size=1440,900",
]
# Laptop screens: the admin must fit them without scrolling sideways (issue 12).
SCREENS = [(1366, 768), (1440, 900)]
# The pictures' width (a laptop's), full height.
SHOT_WIDTH = 1440
# What the screenshots show: the example's demo, run as a user runs it (README), small (three
# orders and their child workflows), without the killed and frozen workers (seconds longer).
DEMO = ["demo", "--events", "40", "--workers", "2", "--no-faults", "--seed", "1"]

# The admin, and the REST API that hands out the long "api:..." lock owners.
urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/machine-memory/", include("machine_memory.contrib.rest_framework.urls")),
]
pytestmark = pytest.mark.urls(__name__)

# Whether the page is wider than the window, every element that cuts its content off or
# scrolls it sideways, and every element that ends past the window's right edge. An owner
# cut with an ellipsis that carries its whole text in its title is fine; so are form fields,
# which scroll by nature, and text for screen readers only. (Content spilling visibly past
# its box, as Django's action bar does by its padding, is left to the other two checks.)
OVERFLOWS = """
const page = document.documentElement;
const found = [];
if (page.scrollWidth > page.clientWidth) {
    found.push(`the page: ${page.scrollWidth}px wide in a ${page.clientWidth}px window`);
}
const named = (element) => element.tagName.toLowerCase() + (element.id ? "#" + element.id : "")
    + (element.className ? "." + String(element.className).trim().split(/\\s+/).join(".") : "");
for (const element of document.body.querySelectorAll("*")) {
    if (element.closest("input, textarea, select, svg, script, style")) continue;
    const style = getComputedStyle(element);
    if (style.display === "none" || style.visibility === "hidden") continue;
    if (style.clip !== "auto" && style.clip !== "") continue;  // read by screen readers only
    const right = element.getBoundingClientRect().right;
    if (right > page.clientWidth + 0.5) {
        found.push(`${named(element)} ends at ${right}px`);
    }
    if (style.overflowX === "visible" || element.clientWidth <= 1) continue;
    if (element.scrollWidth <= element.clientWidth + 1) continue;
    if (style.textOverflow === "ellipsis" && element.title === element.textContent) continue;
    found.push(`${named(element)}: ${element.scrollWidth}px in ${element.clientWidth}px`);
}
return found;
"""


def browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path_ in (CHROMIUM, CHROMEDRIVER):
        if not Path(path_).exists() and not shutil.which(Path(path_).name):
            return f"{path_} is missing (apt-get install chromium chromium-driver)"
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


def run_demo(alias: str) -> list[str]:
    """``manage.py demo`` as the README runs it, alone on ``alias``'s test database; its
    machine ids, in the database's order.

    A subprocess with the example project's own settings: the demo's worker processes
    connect by themselves, and would not find this run's test database through
    tests.settings. DEMO_SQLITE_PATH and DATABASE_URL are the example's own switches.
    """
    # The lists show the demo's machines and nothing else: this run's other tests share the
    # test database, and their rows would fill the pictures and the filters.
    MachineLock.objects.using(alias).all().delete()
    MachineState.objects.using(alias).all().delete()
    connection = connections[alias]
    db = connection.settings_dict
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)  # pytest-django's; the demo has its own
    env.pop("DATABASE_URL", None)
    if connection.vendor == "sqlite":
        env["DEMO_SQLITE_PATH"] = str(db["NAME"])
    else:
        scheme = "postgres" if connection.vendor == "postgresql" else "mysql"
        login = quote(db["USER"], safe="") + (
            f":{quote(db['PASSWORD'], safe='')}" if db["PASSWORD"] else ""
        )
        where = f"{db['HOST'] or '127.0.0.1'}:{db['PORT']}"
        env["DATABASE_URL"] = f"{scheme}://{login}@{where}/{quote(str(db['NAME']), safe='')}"
    result = subprocess.run(
        [sys.executable, str(ROOT / "example_project" / "manage.py"), *DEMO],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return list(MachineState.objects.using(alias).order_by("pk").values_list("pk", flat=True))


def api_lock_url(machine_id: str) -> str:
    return f"/api/machine-memory/locks/{quote_id(machine_id)}/"


def arvo_subject(length: int, tag: str) -> str:
    """A machine id as Arvo makes them (base64 of JSON: no place to break a line)."""
    raw = base64.urlsafe_b64encode(json.dumps({"tag": tag, "pad": "x" * length}).encode())
    return f"arvo.orc.payment/{raw.decode()}"[:length]


def test_admin_in_chromium(alias: str, server: str, browser: Any, tmp_path: Path) -> None:
    from rest_framework.test import APIClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    screenshots = alias == "default"  # one set of pictures, from the SQLite run
    pictures = Path(os.environ.get("MM_SCREENSHOTS") or tmp_path)
    machines = run_demo(alias)
    assert len(machines) >= 2, machines
    tag = new_id("")[-6:]
    password = "correct horse battery staple"
    username = f"ops-{tag}"
    superuser = User.objects.create_superuser(username, password=password)

    def shot(name: str) -> None:
        if not screenshots:
            return
        pictures.mkdir(parents=True, exist_ok=True)
        # The whole page, not just the first screenful.
        size = browser.get_window_size()
        # The window's frame around the page (as tall as a browser's, even headless).
        frame = size["height"] - browser.execute_script("return window.innerHeight")
        page_height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(SHOT_WIDTH, min(max(int(page_height), 600), 2400) + frame)
        assert browser.save_screenshot(str(pictures / f"{name}.png")), name
        browser.set_window_size(size["width"], size["height"])

    def fits(url: str, what: str) -> None:
        """The page at ``url``, at every laptop width: nothing cut, no sideways scrolling."""
        for width, height in SCREENS:
            browser.set_window_size(width, height)
            browser.get(url)
            assert browser.execute_script("return window.innerWidth") == width
            overflows = browser.execute_script(OVERFLOWS)
            assert overflows == [], f"{what} at {width}x{height}: {overflows}"
        browser.set_window_size(SHOT_WIDTH, 900)

    # ALLOWED_HOSTS: what LiveServerTestCase adds for its own server, and the API client's.
    hosts = ["127.0.0.1", "testserver"]
    with override_settings(MACHINE_MEMORY={"DATABASE": alias}, ALLOWED_HOSTS=hosts):
        # A machine locked through the REST API, as a client in the middle of its work; the
        # demo's workers have released theirs (expired rows).
        api = APIClient()
        api.force_authenticate(superuser)
        machine_id = machines[0]
        response = api.post(api_lock_url(machine_id), {"ttl": 300}, format="json")
        assert response.status_code == 201, response.content
        memory = MachineMemory(using=alias)
        info = memory.lock_info(machine_id)
        assert info is not None
        api_owner = info.owner
        expired = MachineLock.objects.using(alias).expired().filter(pk__in=machines)
        assert expired.exists(), "the demo left no released lock to show"
        document = memory.read(machine_id)

        # Log in.
        browser.get(f"{server}/admin/login/?next=/admin/")
        browser.find_element(By.NAME, "username").send_keys(username)
        browser.find_element(By.NAME, "password").send_keys(password)
        browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
        WebDriverWait(browser, 10).until(lambda driver: "Site administration" in driver.title)

        # The list: the demo's machines in id order, one lock live (the API's), the others
        # expired (the demo's workers released them).
        browser.get(f"{server}/admin/machine_memory/machinestate/")
        # Fold the navigation sidebar away (remembered by the browser): room for the columns.
        browser.find_element(By.ID, "toggle-nav-sidebar").click()
        rows = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
        assert [r.find_element(By.CSS_SELECTOR, "th").text for r in rows] == machines
        row = rows[0]
        assert f"live\n{api_owner}" in row.text
        assert "expired\n" in rows[1].text
        shot("admin-states")

        # The state page: the document as pretty JSON, the lock, the parent link.
        row.find_element(By.CSS_SELECTOR, "th a").click()
        pre = browser.find_element(By.CSS_SELECTOR, "pre.machine-memory-state")
        assert json.loads(pre.text) == document
        page = browser.find_element(By.ID, "content").text
        assert "live, " in page and api_owner in page
        shot("admin-state")

        # The lock list: the API's lock live, the demo's expired, with their tokens.
        browser.get(f"{server}/admin/machine_memory/machinelock/")
        table = browser.find_element(By.ID, "result_list").text
        assert api_owner in table and str(info.token) in table
        assert "live" in table and "expired" in table
        shot("admin-locks")

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
        assert f"Released 1 lock(s): {machine_id} (held by {api_owner}" in message
        assert memory.lock_info(machine_id) is None
        assert f"expired\n{api_owner}" in browser.find_element(By.ID, "result_list").text
        shot("admin-released")

        # The longest ids, metadata and owners, at laptop widths, with the navigation
        # sidebar open (the default): every list and page fits.
        longest = arvo_subject(MAX_ID_LENGTH, tag)
        parent = arvo_subject(MAX_ID_LENGTH - 1, tag + "p")
        long_ids = [longest, arvo_subject(200, tag)]
        metadata = {
            "parent_subject": parent,
            "source": "com.example." + "s" * (METADATA_LENGTHS["source"] - 12),
            "initiator": "com.example." + "i" * (METADATA_LENGTHS["initiator"] - 12),
        }
        status = "waiting-" + "w" * (METADATA_LENGTHS["execution_status"] - 8)
        for long_id in [parent, *long_ids]:
            memory.write(long_id, {"executionStatus": status, "id": long_id}, None, metadata)
        response = api.post(api_lock_url(longest), {"ttl": 300}, format="json")
        assert response.status_code == 201, response.content
        worker = MachineMemory(using=alias, owner="worker-" + "w" * (MAX_OWNER_LENGTH - 7))
        assert worker.lock(long_ids[1])
        assert worker.unlock(long_ids[1])
        try:
            browser.find_element(By.ID, "toggle-nav-sidebar").click()
            assert browser.find_element(By.ID, "nav-sidebar").is_displayed()
            states = f"{server}/admin/machine_memory/machinestate/"
            locks = f"{server}/admin/machine_memory/machinelock/"
            for url, what in [
                (states, "the state list"),
                (f"{states}{admin_quote(longest)}/change/", "a state's page"),
                (f"{states}{admin_quote(long_ids[1])}/delete/", "a state's delete page"),
                (locks, "the lock list"),
                (f"{locks}{admin_quote(longest)}/change/", "a lock's page"),
            ]:
                fits(url, what)
            # Cut owners keep their whole text in their title.
            browser.get(locks)
            titles = [
                element.get_attribute("title")
                for element in browser.find_elements(By.CSS_SELECTOR, ".machine-memory-owner")
            ]
            assert api_owner in titles and worker.owner in titles
        finally:
            memory.force_unlock(longest)
