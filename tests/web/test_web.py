"""The web interface (issue 14) end to end in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium; no browser download) against a real manager and endpoint:
search and filters, a servable page, a run from the form and its result, a failing run, a private
servable invisible to another user and to anonymous visitors, sign in and out, the endpoints page
updating while tasks run, /docs and /redoc with the network off; a long call's progress and task
page, the owner's delete and share forms, failed versions with their reason, the citation blocks;
accessibility (every page's labels, headings, landmarks and skip link from the DOM; sign-in and
the run form driven with the keyboard only) and a phone's width.

One Chromium serves every test (cookies cleared between them); every host but 127.0.0.1 resolves
to nothing in it, so no page can reach the network. Screenshots of each page go to
``$DLHUB_SCREENSHOTS`` (default tests/web/screenshots/). Without chromium the tests skip, unless
``DLHUB_REQUIRE_BROWSER=1`` (CI), where they fail.
"""

import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import RESULT_TIMEOUT_S, start_custom_stack, stop_custom_stack, wait_until

from dlhub.executor import Client, NotFoundError, PublishError, Servable
from dlhub.manager.auth import create_user

SHOTS = Path(os.environ.get("DLHUB_SCREENSHOTS") or Path(__file__).parent / "screenshots")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def add(x, y):
    return x + y


def boom(x):
    print(f"about to fail on {x}")
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
        # version 2 of adder fails verification (its example is wrong): the page says why
        wrong = Servable.from_function(
            add, name="adder", title="Adds two numbers", examples=[((1, 2), 4)], **common
        )
        with pytest.raises(PublishError):
            alice.publish(wrong, endpoint=cs.endpoint_name)
        wait_until(
            lambda: len(alice.search(domain="webtesting", limit=50)) == 4, RESULT_TIMEOUT_S, what="verified"
        )
        yield cs
    finally:
        stop_custom_stack(cs)


@pytest.fixture(scope="module")
def shared_browser(browser_paths):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser_paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    # the network is off: no host but this one resolves (an air-gapped site's login node)
    options.add_argument("--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(browser_paths[1]), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def browser(shared_browser, hub):
    """The one browser, signed out, at a laptop's size (1280 x 1000)."""
    d = shared_browser
    d.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    d.set_window_size(1280, 1000)
    d.get(hub.url + "/signin")
    d.delete_all_cookies()
    return d


PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True}


def shot(driver, name: str, phone: bool = False) -> None:
    """A PNG of the whole page (the window, or the phone's screen, sized to the document)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    if phone:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**PHONE, "height": min(height, 6000)})
    else:
        driver.set_window_size(1280, min(max(height + 200, 600), 6000))
    driver.save_screenshot(str(SHOTS / f"{name}.png"))
    if phone:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    else:
        driver.set_window_size(1280, 1000)


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


def text_of(driver, element_id: str) -> str:
    """An element's text now, "" while it is missing or its page is being replaced."""
    from selenium.common.exceptions import WebDriverException

    try:
        return driver.execute_script(
            f"var e = document.getElementById('{element_id}'); return e ? e.textContent : ''"
        )
    except WebDriverException:
        return ""


def result_names(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".hit .ref")]


def test_search_and_filters(hub, browser):
    from selenium.webdriver.common.by import By

    d = browser
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
    # paging: 2 a page, the next page's link, the same 3 servables over both pages in search order
    d.get(hub.url + "/?domain=webtesting&per=2")
    first = result_names(d)
    d.find_element(By.ID, "next-page").click()
    wait_until(lambda: "page=2" in d.current_url, 10, what="page 2")
    assert len(first) == 2 and first + result_names(d) == [
        f"{h['owner']}/{h['name']}" for h in Client(hub.url, hub.tokens["bob"]).search(domain="webtesting")
    ]
    assert d.find_element(By.CSS_SELECTOR, "ol.results").get_attribute("start") == "3"
    d.get(hub.url + "/?owner=nobody-here")
    assert result_names(d) == [] and d.find_element(By.ID, "no-results")
    # the same ranking as Client.search (the REST search)
    d.get(hub.url + "/?q=servable+published")
    hits = Client(hub.url, hub.tokens["bob"]).search("servable published")
    assert result_names(d) == [f"{h['owner']}/{h['name']}" for h in hits][:20]


def test_servable_page_and_run_from_the_form(hub, browser):
    from selenium.webdriver.common.by import By

    d = browser
    d.get(hub.url + "/servables/alice/adder")
    assert d.find_element(By.ID, "servable-title").text == "Adds two numbers"
    assert "@misc{alice_adder_v1" in d.find_element(By.ID, "bibtex").text
    assert d.find_element(By.ID, "servable-status").text == "ready"
    page = d.page_source
    assert "dlhub run alice/adder" in page and "curl -H" in page and "Executor()" in page
    # the citation: BibTeX, and DataCite JSON (in a <details>: read its text, shown or not)
    cite = json.loads(d.execute_script("return document.getElementById('datacite').textContent"))
    assert cite["titles"] == [{"title": "Adds two numbers"}] and cite["creators"][0]["name"] == "Doe, Alice"
    assert cite["types"]["resourceTypeGeneral"] == "Software" and cite["url"].endswith(
        "/servables/alice/adder/1"
    )
    assert f"year = {{{cite['publicationYear']}}}" in d.find_element(By.ID, "bibtex").text
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
    d.get(hub.url + "/tasks")  # my recent tasks, newest first, with the servable each named
    first = d.find_element(By.CSS_SELECTOR, "#tasks tbody tr")
    assert "alice/adder:1" in first.text and "succeeded" in first.text
    shot(d, "tasks")

    # the figures count the call, with its latency in a small plot (its numbers also in text)
    def figures():
        d.get(hub.url + "/servables/alice/adder")
        return "latency p50" in d.find_element(By.ID, "figures").text

    wait_until(figures, 10, interval=0.3, what="the call's latency in the figures")
    assert d.find_element(By.ID, "figures").text.startswith("Calls: 1 ")
    plot = d.find_element(By.CSS_SELECTOR, "figure.plot svg.plot").get_attribute("aria-label")
    assert "<1 ms: 1 calls" in plot or "1-10 ms: 1 calls" in plot, plot  # a sub-10 ms call, counted


def test_a_failing_run_shows_the_error_as_the_rest_api_gives_it(hub, browser):
    import httpx
    from selenium.webdriver.common.by import By

    d = browser
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
    # its task page: the error with the traceback, and what it printed
    d.find_element(By.ID, "task-link").click()
    wait_until(lambda: d.find_elements(By.ID, "task-state"), 10)
    assert d.find_element(By.ID, "task-state").text == "failed"
    assert "boom on 7" in d.find_element(By.ID, "task-error").text
    assert "ValueError" in d.execute_script("return document.getElementById('task-traceback').textContent")
    assert d.find_element(By.ID, "task-stdout").text == "about to fail on 7"
    assert [li.text.split(" ")[0] for li in d.find_elements(By.CSS_SELECTOR, "#task-steps li.done")] == [
        "received",
        "sent",
        "started",
        "finished",
    ]
    shot(d, "failed-task")
    d.get(hub.url + "/servables/alice/boomer")
    # bad JSON in the form: an error, no task
    inputs = d.find_element(By.ID, "inputs")
    inputs.clear()
    inputs.send_keys("{not json")
    d.find_element(By.ID, "run-submit").click()
    wait_until(lambda: "invalid-request: inputs:" in d.page_source, 10, what="the bad JSON's error")


def test_private_servable_is_invisible_to_others_and_anonymous(hub, browser):
    from selenium.webdriver.common.by import By

    d = browser
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
    assert d.find_element(By.CSS_SELECTOR, ".hit .badge").text == "private"  # says so to its owner
    d.get(hub.url + "/servables/alice/secret-model")
    assert d.find_element(By.ID, "servable-title").text == "Alice's secret"
    sign_out(d)
    d.get(hub.url + "/servables/alice/secret-model")
    assert d.find_element(By.ID, "error-message").text == anonymous  # signed out: anonymous again


def test_sign_in_rejects_a_bad_token_and_forms_need_the_session(hub, browser):
    import httpx
    from selenium.webdriver.common.by import By

    d = browser
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


def test_endpoints_page_updates_while_tasks_run(hub, browser):
    from selenium.webdriver.common.by import By

    d = browser
    d.get(hub.url + "/endpoints")
    assert "custom" in live_text(d, "endpoints-live")

    # its blocks with their scheduler job ids (the local provider's: a process id), from the heartbeat
    # (run alone, this test can load the page before the endpoint's first report of its blocks)
    def blocks() -> list[str]:
        return d.execute_script(
            "return [...document.querySelectorAll('table.blocks tbody tr')].map(r => r.textContent.trim())"
        )

    wait_until(blocks, 15, what="the endpoint's blocks on the page")
    assert all(b.startswith("default/") and "RUNNING" in b for b in blocks()), blocks()
    ex = hub.executor(token=hub.tokens["alice"])
    futures = [ex.submit("alice/sleeper", 1.0) for _ in range(8)]  # 2 workers: a queue for ~4 s
    try:
        # the page itself is not reloaded: its script swaps in fresh figures
        marker = d.execute_script("window.__same_page = 1; return 1")
        wait_until(lambda: int(live_text(d, "tasks-open")) > 0, 15, what="open tasks shown live")
        assert d.execute_script("return window.__same_page") == marker
        shot(d, "endpoints-busy")
        assert [f.result(RESULT_TIMEOUT_S) for f in futures] == [1.0] * 8
        wait_until(lambda: live_text(d, "tasks-open") == "0", 15, what="the queue drained")
        # the plot of throughput and queue depth: both lines, the queue's peak in its legend
        assert len(d.find_elements(By.CSS_SELECTOR, "svg.plot polyline")) == 2
        legend = d.execute_script("return document.querySelector('svg.plot text.s1').textContent")
        assert legend.startswith("queue depth: now 0, max ") and int(legend.rsplit(" ", 1)[1]) >= 1, legend
        shot(d, "endpoints")
    finally:
        ex.shutdown(wait=False)


def test_docs_render_without_the_network(hub, browser):
    from selenium.webdriver.common.by import By

    d = browser
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


def test_owner_deletes_a_failed_version_and_shares_from_the_page(hub, browser):
    import httpx
    from selenium.webdriver.common.by import By

    d = browser
    alice = Client(hub.url, hub.tokens["alice"])
    reason = next(v["error"] for v in alice.versions("alice/adder") if v["version"] == 2)
    # not the owner: no delete links, no sharing form
    sign_in(d, hub, "bob")
    d.get(hub.url + "/servables/alice/adder")
    assert not d.find_elements(By.CSS_SELECTOR, ".delete-link") and not d.find_elements(By.ID, "share-users")
    bob_csrf = d.find_element(By.CSS_SELECTOR, "form[action='/signout'] [name=csrf]").get_attribute("value")
    bob_cookie = d.get_cookie("dlhub_session")["value"]
    with httpx.Client(base_url=hub.url, timeout=30, cookies={"dlhub_session": bob_cookie}) as h:
        r = h.post("/servables/alice/adder/2/delete", data={"csrf": bob_csrf})
        assert r.status_code == 403, r.text  # a valid session and token, but not the owner's
    sign_out(d)
    sign_in(d, hub, "alice")
    d.get(hub.url + "/servables/alice/adder")
    # the failed version says why, as the REST API does
    row = d.find_element(By.XPATH, "//table[@id='versions']//tr[td[1][normalize-space()='2']]")
    assert "failed" in row.text and row.find_element(By.CSS_SELECTOR, ".reason").text == reason
    shot(d, "servable-owner")
    # delete it: a confirmation page, then the POST with the session's CSRF token
    cookie = d.get_cookie("dlhub_session")["value"]
    with httpx.Client(base_url=hub.url, timeout=30, cookies={"dlhub_session": cookie}) as h:
        assert h.post("/servables/alice/adder/2/delete", data={"csrf": "forged"}).status_code == 403
    assert [v["status"] for v in alice.versions("alice/adder")] == ["ready", "failed"]
    d.find_element(By.ID, "delete-2").click()
    wait_until(lambda: d.find_elements(By.ID, "delete-confirm"), 10, what="the confirmation page")
    shot(d, "delete")
    d.find_element(By.ID, "delete-confirm").click()
    wait_until(lambda: d.current_url.endswith("/servables/alice/adder"), 10, what="back to the servable")
    assert [v["status"] for v in alice.versions("alice/adder")] == ["ready", "deleted"]
    assert (
        "deleted"
        in d.find_element(By.XPATH, "//table[@id='versions']//tr[td[1][normalize-space()='2']]").text
    )
    # share the private servable with bob from its page, then take it back
    bob = Client(hub.url, hub.tokens["bob"])
    d.get(hub.url + "/servables/alice/secret-model")
    d.find_element(By.ID, "share-users").send_keys("bob")
    d.find_element(By.ID, "share-submit").click()
    wait_until(lambda: "users: bob;" in text_of(d, "shares"), 10, what="shared with bob")
    assert bob.describe("alice/secret-model")["record"]["title"] == "Alice's secret"
    d.find_element(By.ID, "share-users").send_keys("bob")
    d.find_element(By.CSS_SELECTOR, "#share-action option[value=unshare]").click()
    d.find_element(By.ID, "share-submit").click()
    wait_until(lambda: "users: none;" in text_of(d, "shares"), 10, what="unshared")
    with pytest.raises(NotFoundError, match="secret-model"):
        bob.describe("alice/secret-model")


def test_a_long_call_shows_its_progress_and_task_page(hub, browser, monkeypatch):
    from selenium.webdriver.common.by import By

    import dlhub.manager.web as web

    monkeypatch.setattr(web, "RUN_WAIT_S", 1.0)  # the form gives up waiting after 1 s (10 s normally)
    d = browser
    sign_in(d, hub, "alice")
    d.get(hub.url + "/servables/alice/sleeper")
    # while the form waits for the answer its script says so and counts the seconds (seen here
    # with the submission held back: the browser would replace the page before we could look)
    d.execute_script(
        "document.getElementById('run-form').addEventListener('submit', e => e.preventDefault())"
    )
    d.find_element(By.ID, "run-submit").click()
    progress = d.find_element(By.ID, "run-progress")
    assert progress.is_displayed() and progress.text.startswith("Running… 0 s")
    assert not d.find_element(By.ID, "run-submit").is_enabled()  # not submitted twice
    d.get(hub.url + "/servables/alice/sleeper")
    assert not d.find_element(By.ID, "run-progress").is_displayed()
    inputs = d.find_element(By.ID, "inputs")
    inputs.clear()
    inputs.send_keys('{"args": [2]}')
    d.find_element(By.ID, "run-submit").click()
    wait_until(lambda: d.find_elements(By.ID, "run-pending"), 20, what="the still-running outcome")
    assert "keeps running" in d.find_element(By.ID, "run-pending").text
    d.find_element(By.ID, "task-link").click()
    wait_until(lambda: d.find_elements(By.ID, "task-state"), 10)
    assert d.find_element(By.ID, "task-state").text in ("queued", "dispatched", "running")
    assert d.find_element(By.ID, "task-running").text.startswith("Still ")
    assert "not yet" in d.find_element(By.ID, "task-steps").text
    shot(d, "task-running")
    # the page reloads itself until the task is done
    wait_until(
        lambda: text_of(d, "task-state") == "succeeded" and text_of(d, "task-result"),
        20,
        interval=0.25,
        what="the task page showing the result",
    )
    assert json.loads(text_of(d, "task-result")) == 2


AUDIT = """
const problems = [];
const named = (el) => {
  if (el.getAttribute('aria-label') || el.getAttribute('aria-labelledby')) return true;
  if (el.id && document.querySelector('label[for="' + el.id + '"]')) return true;
  if (el.closest('label')) return true;
  return false;
};
for (const el of document.querySelectorAll('input, select, textarea')) {
  if (el.type === 'hidden') continue;
  if (!named(el)) problems.push('no label: ' + el.outerHTML.slice(0, 80));
}
for (const el of document.querySelectorAll('button, a[href]')) {
  if (!(el.textContent.trim() || el.getAttribute('aria-label')))
    problems.push('no name: ' + el.outerHTML.slice(0, 80));
}
for (const el of document.querySelectorAll('svg, img')) {
  if (!(el.getAttribute('aria-label') || el.getAttribute('alt') || el.getAttribute('aria-hidden')))
    problems.push('no text alternative: ' + el.outerHTML.slice(0, 80));
}
const levels = [...document.querySelectorAll('h1, h2, h3, h4, h5, h6')].map((h) => +h.tagName[1]);
if (levels.filter((l) => l === 1).length !== 1) problems.push('h1 count: ' + levels.join(','));
if (levels[0] !== 1) problems.push('first heading is not h1: ' + levels.join(','));
for (let i = 1; i < levels.length; i++)
  if (levels[i] > levels[i - 1] + 1) problems.push('heading skips a level: ' + levels.join(','));
for (const sel of ['header', 'nav', 'main#main', 'footer'])
  if (!document.querySelector(sel)) problems.push('no ' + sel);
const skip = document.querySelector('body > a.skip');
if (!skip || skip !== document.querySelector('a[href]') || skip.getAttribute('href') !== '#main')
  problems.push('the first link is not the skip link');
if (!document.documentElement.lang) problems.push('no lang');
if (!document.title.trim()) problems.push('no title');
const ids = [...document.querySelectorAll('[id]')].map((e) => e.id);
const dups = ids.filter((x, i) => ids.indexOf(x) !== i);
if (dups.length) problems.push('duplicate ids: ' + dups.join(','));
return problems;
"""


def test_every_page_has_labels_headings_landmarks_and_a_skip_link(hub, browser):
    from selenium.webdriver.common.by import By

    d = browser
    pages = ["/signin", "/?q=adds", "/servables/alice/adder", "/servables/alice/no-such-model"]
    for page in pages:
        d.get(hub.url + page)
        assert d.execute_script(AUDIT) == [], page
    sign_in(d, hub, "alice")
    d.get(hub.url + "/tasks")
    task = d.find_element(By.CSS_SELECTOR, "#tasks tbody a").get_attribute("href")
    signed_in = [
        "/",
        "/servables/alice/adder",
        "/servables/alice/secret-model",
        "/servables/alice/adder/1/delete",
    ]
    for page in [*signed_in, "/tasks", task.removeprefix(hub.url), "/endpoints"]:
        d.get(hub.url + page)
        assert d.execute_script(AUDIT) == [], page
    # the audit finds what it looks for: a page with an unlabelled box and a skipped heading
    bad = "<input id=x><h4>deep</h4><h1>two</h1>"
    d.execute_script(f"document.querySelector('main').insertAdjacentHTML('beforeend', '{bad}')")
    found = d.execute_script(AUDIT)
    assert any(p.startswith("no label") for p in found) and any("h1 count" in p for p in found), found


def test_sign_in_and_run_with_the_keyboard_only(hub, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    keys = ActionChains(d)

    def active() -> str:
        return d.execute_script("var a = document.activeElement; return a.id || a.className || a.tagName")

    def tab_to(element_id: str, limit: int = 25) -> int:
        """TAB until the element has the focus; the number of presses."""
        for n in range(1, limit + 1):
            keys.send_keys(Keys.TAB).perform()
            if active() == element_id:
                return n
        raise AssertionError(f"{element_id} not reached with {limit} TABs (focus on {active()})")

    d.get(hub.url + "/servables/alice/adder")
    # the first TAB reaches the skip link, shown on focus, with a visible focus ring
    keys.send_keys(Keys.TAB).perform()
    assert active() == "skip"
    skip = d.switch_to.active_element
    assert skip.is_displayed() and skip.rect["x"] >= 0
    ring = d.execute_script(
        "var s = getComputedStyle(document.activeElement); return [s.outlineStyle, s.boxShadow]"
    )
    assert ring[0] != "none" or ring[1] != "none", ring
    # ENTER on the signin link in the header: sign in with TAB, typing and ENTER
    tab_to("signin-link")
    keys.send_keys(Keys.ENTER).perform()
    wait_until(lambda: d.find_elements(By.ID, "token"), 10, what="the sign-in page")
    tab_to("token")
    keys.send_keys(hub.tokens["alice"]).send_keys(Keys.ENTER).perform()
    wait_until(lambda: d.find_elements(By.ID, "signed-in-user"), 10, what="signed in")
    assert d.current_url.endswith("/servables/alice/adder")  # back where the link was followed
    # the run form: TAB into the inputs, replace them, TAB to Run, ENTER
    tab_to("inputs", limit=40)
    keys.key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL).send_keys('{"args": [20, 22]}').perform()
    tab_to("endpoint")
    tab_to("run-submit")
    keys.send_keys(Keys.ENTER).perform()
    wait_until(lambda: d.find_elements(By.ID, "run-result"), RESULT_TIMEOUT_S, what="the run's result")
    assert json.loads(d.find_element(By.ID, "run-result").text) == 42
    shot(d, "servable-run")  # with the figures of the earlier calls (the README's picture)


def test_phone_width(hub, browser):
    from selenium.webdriver.common.by import By

    d = browser
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    sign_in(d, hub, "alice")
    for page, name in (
        ("/servables/alice/adder", "phone-servable"),
        ("/?domain=webtesting", "phone-search"),
        ("/endpoints", "phone-endpoints"),
        ("/tasks", "phone-tasks"),
    ):
        d.get(hub.url + page)
        assert d.execute_script("return window.innerWidth") == 390
        # nothing wider than the screen but what scrolls on its own (code, tables)
        overflow = d.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, (page, overflow)
        shot(d, name, phone=True)
    assert d.find_element(By.ID, "signed-in-user").is_displayed()


def test_pages_work_without_javascript(hub):
    """The HTML as served (no script run): search, sign in, run from the form and read the
    result, the endpoints page (which reloads itself without a script), the task list."""
    import re

    import httpx

    with httpx.Client(base_url=hub.url, timeout=RESULT_TIMEOUT_S) as h:
        assert "alice/adder" in h.get("/?domain=webtesting").text
        r = h.post("/signin", data={"token": hub.tokens["alice"], "next": "/servables/alice/adder"})
        assert r.status_code == 303 and r.headers["location"] == "/servables/alice/adder"
        page = h.get("/servables/alice/adder").text
        assert 'id="signed-in-user">alice<' in page and "@misc{alice_adder_v1" in page
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        r = h.post(
            "/servables/alice/adder/run", data={"csrf": csrf, "inputs": '{"args": [2, 3]}', "version": "1"}
        )
        result = re.search(r'<pre id="run-result"><code>(.*?)</code>', r.text, re.S)
        assert r.status_code == 200 and result and result.group(1).strip() == "5"
        endpoints = h.get("/endpoints").text
        assert '<noscript><meta http-equiv="refresh" content="5"></noscript>' in endpoints
        assert re.search(r'<h2 id="ep-1">custom <span class="status status-ready">connected', endpoints)
        assert re.search(r'<a href="/tasks/[0-9a-f]{32}"', h.get("/tasks").text)
