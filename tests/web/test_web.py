"""The web interface (issue 14) end to end in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium; no browser download) against a real manager and endpoint:
search and filters, a servable page, a run from the form and its result, a failing run, a private
servable invisible to another user and to anonymous visitors, sign in and out, the endpoints page
updating while tasks run, and /docs with no external requests.

Screenshots of each page go to ``$DLHUB_SCREENSHOTS`` (default tests/web/screenshots/). Without
chromium the tests skip, unless ``DLHUB_REQUIRE_BROWSER=1`` (CI), where they fail.
"""

import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import RESULT_TIMEOUT_S, start_custom_stack, stop_custom_stack, wait_until

from dlhub.executor import Client, Servable
from dlhub.manager.auth import create_user

SHOTS = Path(os.environ.get("DLHUB_SCREENSHOTS") or Path(__file__).parent / "screenshots")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def add(x, y):
    return x + y


def boom(x):
    raise ValueError(f"boom on {x}")


def slow(x):
    import time

    time.sleep(x)
    return x


def secret_sauce(x):
    return f"secret:{x}"


@pytest.fixture(scope="module")
def browser_paths():
    if CHROMIUM is None or CHROMEDRIVER is None:
        message = "the web tests need Debian's chromium and chromium-driver (apt-get install both)"
        if os.environ.get("DLHUB_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM, CHROMEDRIVER


@pytest.fixture(scope="module")
def hub(tmp_path_factory, browser_paths):
    """A manager + endpoint ``custom`` (2 workers); alice publishes add (public), boom (public),
    slow (public) and secret (private); bob is another user."""
    root = tmp_path_factory.mktemp("dlhub-web")
    cs = start_custom_stack(root, endpoint={"policy": {"allowed_users": ["alice", "bob"]}}, workers=2)
    try:
        engine = cs.manager.auth.engine
        cs.tokens = {u: create_user(engine, u) for u in ("alice", "bob")}
        cs.url = cs.manager.api.url
        alice = Client(cs.url, cs.tokens["alice"])
        common = {"authors": ["Doe, Alice"], "domains": ["webtesting"]}
        for fn, name, title, examples, extra in (
            (add, "adder", "Adds two numbers", [((1, 2), 3)], {"domains": ["webtesting", "arithmetic"]}),
            (boom, "boomer", "Always raises", [], {}),
            (slow, "sleeper", "Sleeps then answers", [((0.01,), 0.01)], {}),
            (secret_sauce, "secret-model", "Alice's secret", [((1,), "secret:1")], {"visibility": "private"}),
        ):
            s = Servable.from_function(
                fn,
                name=name,
                title=title,
                description=f"The {name} servable, published by the web tests.",
                examples=examples,
                **{**common, **extra},
            )
            alice.publish(s, endpoint=cs.endpoint_name)
        wait_until(
            lambda: len(alice.search(domain="webtesting", limit=50)) == 4, RESULT_TIMEOUT_S, what="verified"
        )
        yield cs
    finally:
        stop_custom_stack(cs)


@pytest.fixture(scope="module")
def make_browser(browser_paths):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers = []

    def make(width: int = 1280, height: int = 1000):
        options = webdriver.ChromeOptions()
        options.binary_location = browser_paths[0]
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
            options.add_argument(arg)
        options.add_argument(f"--window-size={width},{height}")
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
        driver = webdriver.Chrome(service=Service(browser_paths[1]), options=options)
        driver.set_page_load_timeout(60)
        drivers.append(driver)
        return driver

    yield make
    for d in drivers:
        d.quit()


def shot(driver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    # the whole page: size the window to the document first
    height = driver.execute_script("return document.documentElement.scrollHeight")
    width = driver.execute_script("return window.innerWidth")
    driver.set_window_size(max(width, 360), min(max(height + 120, 600), 6000))
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def sign_in(driver, hub, user: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(hub.url + "/signin")
    driver.find_element(By.ID, "token").send_keys(hub.tokens[user])
    driver.find_element(By.ID, "signin-submit").click()
    wait_until(lambda: driver.find_elements(By.ID, "signed-in-user"), 10, what="signed in")
    assert driver.find_element(By.ID, "signed-in-user").text == user


def sign_out(driver) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "signout").click()
    wait_until(lambda: driver.find_elements(By.ID, "signin-link"), 10, what="signed out")


def live_text(driver, element_id: str) -> str:
    """The text of an element the endpoints page's script replaces every 2 s (read in one step,
    so the element cannot go stale between finding and reading it)."""
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def result_names(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".hit .ref")]


def test_search_and_filters(hub, make_browser):
    from selenium.webdriver.common.by import By

    d = make_browser()
    d.get(hub.url + "/?domain=webtesting")
    assert set(result_names(d)) == {"alice/adder", "alice/boomer", "alice/sleeper"}  # not the private one
    box = d.find_element(By.ID, "q")
    box.send_keys("adds")
    d.find_element(By.ID, "search-submit").click()
    wait_until(lambda: "q=adds" in d.current_url, 10)
    assert result_names(d) == ["alice/adder"]
    shot(d, "search")
    d.get(hub.url + "/?domain=arithmetic")
    assert result_names(d) == ["alice/adder"]
    d.get(hub.url + "/?owner=nobody-here")
    assert result_names(d) == [] and d.find_element(By.ID, "no-results")
    # the same ranking as Client.search (the REST search)
    d.get(hub.url + "/?q=servable+published")
    hits = Client(hub.url, hub.tokens["bob"]).search("servable published")
    assert result_names(d) == [f"{h['owner']}/{h['name']}" for h in hits][:20]


def test_servable_page_and_run_from_the_form(hub, make_browser):
    from selenium.webdriver.common.by import By

    d = make_browser()
    d.get(hub.url + "/servables/alice/adder")
    assert d.find_element(By.ID, "servable-title").text == "Adds two numbers"
    assert "@misc{alice_adder_v1" in d.find_element(By.ID, "bibtex").text
    assert d.find_element(By.ID, "servable-status").text == "ready"
    page = d.page_source
    assert "dlhub run alice/adder" in page and "curl -H" in page and "Executor()" in page
    assert not d.find_elements(By.ID, "run-form")  # anonymous: sign in to run
    sign_in(d, hub, "alice")
    d.get(hub.url + "/servables/alice/adder")
    inputs = d.find_element(By.ID, "inputs")
    assert json.loads(inputs.get_attribute("value")) == {"args": [1, 2], "kwargs": {}}  # the first example
    inputs.clear()
    inputs.send_keys('{"args": [40, 2]}')
    d.find_element(By.ID, "run-submit").click()
    wait_until(lambda: d.find_elements(By.ID, "run-outcome"), RESULT_TIMEOUT_S, what="the run's outcome")
    assert json.loads(d.find_element(By.ID, "run-result").text) == 42
    shot(d, "servable")
    d.find_element(By.ID, "task-link").click()
    wait_until(lambda: d.find_elements(By.ID, "task-state"), 10)
    assert d.find_element(By.ID, "task-state").text == "succeeded"
    assert json.loads(d.find_element(By.ID, "task-result").text) == 42
    shot(d, "task")
    d.get(hub.url + "/tasks")
    assert d.find_elements(By.CSS_SELECTOR, "#tasks tbody tr")
    shot(d, "tasks")
    # the figures count the call
    d.get(hub.url + "/servables/alice/adder")
    assert d.find_element(By.ID, "figures").text.startswith("Calls: ")


def test_a_failing_run_shows_the_error_as_the_rest_api_gives_it(hub, make_browser):
    import httpx
    from selenium.webdriver.common.by import By

    d = make_browser()
    sign_in(d, hub, "alice")
    d.get(hub.url + "/servables/alice/boomer")
    inputs = d.find_element(By.ID, "inputs")
    inputs.clear()
    inputs.send_keys('{"args": [7]}')
    d.find_element(By.ID, "run-submit").click()
    wait_until(lambda: d.find_elements(By.ID, "run-outcome"), RESULT_TIMEOUT_S, what="the run's outcome")
    shown = d.find_element(By.ID, "run-error").text
    with httpx.Client(base_url=hub.url, timeout=60) as h:
        rest = h.post(
            "/api/v1/servables/alice/boomer/run",
            json={"args": [7]},
            headers={"Authorization": f"Bearer {hub.tokens['alice']}"},
        ).json()
    assert "boom on 7" in shown and shown == f"{rest['code']}: {rest['message']}"
    shot(d, "failed-run")
    # bad JSON in the form: an error, no task
    inputs = d.find_element(By.ID, "inputs")
    inputs.clear()
    inputs.send_keys("{not json")
    d.find_element(By.ID, "run-submit").click()
    wait_until(lambda: "invalid-request: inputs:" in d.page_source, 10, what="the bad JSON's error")


def test_private_servable_is_invisible_to_others_and_anonymous(hub, make_browser):
    from selenium.webdriver.common.by import By

    d = make_browser()
    d.get(hub.url + "/servables/alice/secret-model")
    anonymous = d.find_element(By.ID, "error-message").text
    d.get(hub.url + "/servables/alice/no-such-model")
    assert anonymous == d.find_element(By.ID, "error-message").text.replace("no-such-model", "secret-model")
    d.get(hub.url + "/?q=secret")
    assert "alice/secret-model" not in result_names(d)
    sign_in(d, hub, "bob")
    d.get(hub.url + "/servables/alice/secret-model")
    assert d.find_element(By.ID, "error-message").text == anonymous
    d.get(hub.url + "/?q=secret")
    assert "alice/secret-model" not in result_names(d)
    sign_out(d)
    sign_in(d, hub, "alice")
    d.get(hub.url + "/?q=secret")
    assert "alice/secret-model" in result_names(d)
    d.get(hub.url + "/servables/alice/secret-model")
    assert d.find_element(By.ID, "servable-title").text == "Alice's secret"
    sign_out(d)
    d.get(hub.url + "/servables/alice/secret-model")
    assert d.find_element(By.ID, "error-message").text == anonymous  # signed out: anonymous again


def test_sign_in_rejects_a_bad_token_and_forms_need_the_session(hub, make_browser):
    import httpx
    from selenium.webdriver.common.by import By

    d = make_browser()
    d.get(hub.url + "/signin")
    d.find_element(By.ID, "token").send_keys("not-a-token")
    d.find_element(By.ID, "signin-submit").click()
    wait_until(lambda: "error=invalid" in d.current_url, 10)
    assert "not valid" in d.find_element(By.CSS_SELECTOR, "[role=alert]").text
    shot(d, "signin")
    sign_in(d, hub, "alice")
    cookie = d.get_cookie("dlhub_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # the session cookie without the form's CSRF token does not run anything
    with httpx.Client(base_url=hub.url, timeout=30, cookies={"dlhub_session": cookie["value"]}) as h:
        r = h.post("/servables/alice/adder/run", data={"inputs": '{"args": [1, 1]}', "csrf": "forged"})
        assert r.status_code == 403 and "CSRF" in r.text
        # and the cookie is no bearer token for the REST API
        assert h.post("/api/v1/servables/alice/adder/run", json={"args": [1, 1]}).status_code == 401


def test_endpoints_page_updates_while_tasks_run(hub, make_browser):
    from selenium.webdriver.common.by import By

    d = make_browser()
    d.get(hub.url + "/endpoints")
    assert "custom" in live_text(d, "endpoints-live")
    ex = hub.executor(token=hub.tokens["alice"])
    futures = [ex.submit("alice/sleeper", 1.0) for _ in range(8)]  # 2 workers: a queue for ~4 s
    try:
        # the page itself is not reloaded: its script swaps in fresh figures
        marker = d.execute_script("window.__same_page = 1; return 1")
        wait_until(lambda: int(live_text(d, "tasks-open")) > 0, 15, what="open tasks shown live")
        assert d.execute_script("return window.__same_page") == marker
        shot(d, "endpoints")
        assert [f.result(RESULT_TIMEOUT_S) for f in futures] == [1.0] * 8
        wait_until(lambda: live_text(d, "tasks-open") == "0", 15, what="the queue drained")
        assert d.find_elements(By.CSS_SELECTOR, "svg.plot polyline")  # throughput / queue depth plot
    finally:
        ex.shutdown(wait=False)


def test_docs_render_without_the_network(hub, make_browser):
    from selenium.webdriver.common.by import By

    d = make_browser()
    for page, ready in (("/docs", ".swagger-ui .info"), ("/redoc", "[role=search], .api-content")):
        d.get_log("performance")  # drop earlier entries
        d.get(hub.url + page)
        wait_until(lambda ready=ready: d.find_elements(By.CSS_SELECTOR, ready), 20, what=f"{page} rendered")
        hosts = set()
        for entry in d.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                url = message["params"]["request"]["url"]
                if url.startswith("http"):
                    hosts.add(urlparse(url).netloc)
        assert hosts == {urlparse(hub.url).netloc}, hosts
        for src in d.find_elements(By.CSS_SELECTOR, "script[src], link[href]"):
            url = src.get_attribute("src") or src.get_attribute("href")
            assert urlparse(url).netloc == urlparse(hub.url).netloc, url
        shot(d, page.strip("/"))


def test_phone_width(hub, make_browser):
    d = make_browser(390, 844)
    d.get(hub.url + "/servables/alice/adder")
    # nothing wider than the screen but what scrolls on its own (code, tables)
    overflow = d.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, overflow
    shot(d, "phone-servable")
