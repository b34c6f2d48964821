"""The web page in a real browser (Debian's headless chromium, driven by selenium) against a real
tritonserver whose cache was warmed: recommendations as one types, the gallery, Generate."""

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request

import pytest

from voltacache.benchmark import free_port
from voltacache.serving.client import Client
from voltacache.ui.app import make_app

pytestmark = pytest.mark.browser

# prompts no other test stores: the session's cached_server holds those of other tests too
WARM = ["a paper boat on a puddle", "a violin resting on a velvet chair", "a snail climbing a glass window"]
STEPS = 4
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def page(cached_server):
    """The page on a free loopback port, over a server whose cache holds WARM."""
    import uvicorn

    client = Client(cached_server.grpc_url)
    for i, prompt in enumerate(WARM):
        # DeepCache N=2: part of an entry's scope, which a click on its image must carry to Generate
        client.generate(prompt, steps=STEPS, seed=300 + i, scheduler="ddim", cache_interval=2, cache_mode="refresh")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(client), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed: `make browser` installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # offline: no background connections (this machine refuses them), no sandbox as root
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--no-first-run",
        "--window-size=1000,1400",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def texts(driver, selector):
    """The text of every element matching `selector`, read at once (the page re-renders as answers come)."""
    script = "return [...document.querySelectorAll(arguments[0])].map((e) => e.innerText)"
    return driver.execute_script(script, selector)


def click(driver, selector):
    """Click the first element matching `selector`, again if the page re-rendered it meanwhile."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def clicked(d):
        try:
            d.find_element(By.CSS_SELECTOR, selector).click()
            return True
        except StaleElementReferenceException:
            return False

    wait(driver, clicked)


def test_typing_recommends_the_gallery_fills_and_generate_reports_the_layer(page, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(page)
    # on load: the newest stored images, the warmed ones among them
    wait(browser, lambda d: set(WARM) <= {c.split("\n")[0] for c in texts(d, "#gallery figcaption")})

    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("violin on a chair")
    wait(browser, lambda d: any(t.startswith(WARM[1]) for t in texts(d, "#recommendations li")))
    assert not any(t.startswith(WARM[0]) for t in texts(browser, "#recommendations li"))  # unrelated: not offered
    wait(
        browser,
        lambda d: texts(d, "#gallery figcaption")[:1] and texts(d, "#gallery figcaption")[0].startswith(WARM[1]),
    )
    assert "nearest" in browser.find_element(By.ID, "gallery-title").text

    click(browser, "#recommendations li")  # fills the prompt
    assert prompt.get_attribute("value") == WARM[1]

    # the stored image's own request (its seed, steps, scheduler, from a click on it): the cache answers
    wait(browser, lambda d: texts(d, "#gallery figcaption")[0].startswith(WARM[1]))
    click(browser, "#gallery figure")
    assert browser.find_element(By.ID, "seed").get_attribute("value") == "301"
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: texts(d, "#result-info .layer"))
    layer = browser.find_element(By.CSS_SELECTOR, "#result-info .layer")
    assert layer.get_attribute("data-layer") == "semantic", layer.text
    assert browser.find_element(By.ID, "result-image").get_attribute("src").startswith("data:image/png;base64,")
    browser.save_screenshot(os.environ.get("VOLTACACHE_UI_SCREENSHOT", str(tmp_path / "page.png")))

    # a new prompt: generated (or started from a neighbour's latent), and said so
    prompt.clear()
    prompt.send_keys("a blue sailboat on a calm lake")
    browser.find_element(By.ID, "seed").clear()
    browser.find_element(By.ID, "generate").click()
    layers = "return [...document.querySelectorAll('#result-info .layer')].map((e) => e.dataset.layer)"
    wait(browser, lambda d: set(d.execute_script(layers)) & {"miss", "approximate"})
    assert "steps" in browser.find_element(By.ID, "result-info").text

    # a malformed request: the server's one-line message on the page, and the page goes on
    steps = browser.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("0")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: "steps" in d.find_element(By.ID, "error").text)


def call(page, path, body=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(page + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize(
    "path, body, words",
    [
        ("/api/generate", b"not json", "not JSON"),
        ("/api/generate", ["a list"], "not a JSON object"),
        ("/api/generate", {"prompt": "x", "colour": "red"}, "colour: not a field"),
        ("/api/generate", {"prompt": 5}, "prompt"),
        ("/api/generate", {"prompt": "x", "steps": "many"}, "steps"),
        ("/api/generate", {"prompt": "x", "guidance": 99}, "guidance"),
        ("/api/gallery?q=x&top=many", None, "top"),
        ("/api/gallery?q=x&top=1000", None, "top"),
    ],
)
def test_the_api_refuses_malformed_input_with_a_message(page, path, body, words):
    status, answer = call(page, path, body)
    assert status == 400 and words in answer["error"] and "\n" not in answer["error"]
    assert call(page, "/api/recommend?q=violin")[0] == 200  # still serving


def test_the_page_needs_nothing_from_the_internet(page):
    html = urllib.request.urlopen(page, timeout=10).read().decode()
    assert "http://" not in html and "https://" not in html
    for asset in ("/static/app.js", "/static/style.css"):
        assert "https://" not in urllib.request.urlopen(page + asset, timeout=10).read().decode()
