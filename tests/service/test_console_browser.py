"""The web console and the API docs in a real browser: Debian's headless Chromium driven by
Selenium through Debian's chromedriver, against a real uvicorn server (bundled model, API keys
on). Real CUHK03 images are uploaded through the page and queried; what the page shows is
checked against the API's own answer. The browser cannot reach anything but 127.0.0.1 (an
unresolvable host map and a dead proxy), as on an offline site.

A screenshot of the ranked results is written to ``$DSMI_TEST_ARTIFACTS`` (default
``test-artifacts/``, git-ignored): ``console-results.png``. ``.ci/run`` installs Chromium when
it is missing; without it (or the shared data) these tests skip and say why.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.engine import Engine
from service.settings import DEFAULT_MODEL_DIR, Settings
from tests.conftest import ROOT
from tests.service_support import ThreadedServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
DATA = Path(os.environ.get("DSMI_DATA", ROOT.parent / "shared" / "data"))
ARTIFACTS = Path(os.environ.get("DSMI_TEST_ARTIFACTS", ROOT / "test-artifacts"))
KEY = "console-test-key-1"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="Chromium and chromedriver are not installed (apt-get install chromium "
           "chromium-driver; .ci/run does it)")


@pytest.fixture(scope="module")
def server():
    engine = Engine(DEFAULT_MODEL_DIR, providers=["cpu"])
    app = create_app(Settings(api_keys=[KEY]), engine=engine)
    with ThreadedServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1800", "--disable-gpu",
                # Offline: no name resolves but the loopback address, and anything that
                # would still go out meets a proxy that is not there.
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(predicate, timeout: float = 30.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def cuhk03_images() -> tuple[list[Path], Path]:
    """Six ``val`` people: two camera-2 images each (the gallery), and one camera-1 image of
    the first of them (the probe)."""
    manifest = DATA / "cuhk03-labeled.csv"
    if not manifest.is_file():
        pytest.skip(f"{manifest} not found (set DSMI_DATA)")
    with manifest.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "val"]
    people = sorted({r["pid"] for r in rows}, key=int)[:6]
    gallery = []
    for pid in people:
        gallery += [DATA / r["path"] for r in rows if r["pid"] == pid and r["camid"] == "2"][:2]
    probe = next(DATA / r["path"] for r in rows if r["pid"] == people[0] and r["camid"] == "1")
    return gallery, probe


def test_upload_browse_query_and_delete_through_the_console(server, browser):
    from selenium.webdriver.common.by import By

    gallery_files, probe_file = cuhk03_images()
    api = httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=30)

    def el(testid: str):
        return browser.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    browser.get(server.url + "/")
    variant = json.loads((DEFAULT_MODEL_DIR / "manifest.json").read_text())["variant"]
    wait_for(lambda: f"model {variant}" in el("status").text, what="the status line")
    # Without the key the API refuses, and the page says what to do.
    wait_for(lambda: "API key" in el("message").text, what="the key hint")
    el("api-key").send_keys(KEY)
    el("save-key").click()
    el("new-gallery-name").send_keys("cuhk")
    el("create-gallery").click()
    assert el("gallery-name").text == "cuhk"

    camera = el("all-camera")
    camera.clear()
    camera.send_keys("2")
    el("upload-files").send_keys("\n".join(str(p) for p in gallery_files))
    rows = browser.find_elements(By.CSS_SELECTOR, '[data-testid="upload-table"] tbody tr')
    assert len(rows) == len(gallery_files) == 12
    persons = [r.find_element(By.CSS_SELECTOR, 'input[data-field="person"]').get_attribute(
        "value") for r in rows]
    assert persons == [p.name.split("_")[0] for p in gallery_files]
    el("upload").click()
    wait_for(lambda: el("gallery-size").text == "12", what="the upload")
    listed = api.get("/v1/galleries/cuhk/images").json()
    assert listed["total"] == 12
    assert {(x["person_id"], x["camera_id"], x["filename"]) for x in listed["images"]} == \
        {(p.name.split("_")[0], "2", p.name) for p in gallery_files}
    wait_for(lambda: len(browser.find_elements(
        By.CSS_SELECTOR, '[data-testid="browse"] li img[data-loaded="1"]')) == 12,
        what="12 thumbnails")
    browse = browser.find_elements(By.CSS_SELECTOR, '[data-testid="browse"] li img')

    # Query: the page's ranking is the API's, thumbnails shown, the true matches marked.
    probe_person = probe_file.name.split("_")[0]
    el("probe-file").send_keys(str(probe_file))
    assert el("probe-person").get_attribute("value") == probe_person
    el("query").click()
    cards = wait_for(lambda: browser.find_elements(
        By.CSS_SELECTOR, '[data-testid="results"] li'), what="the results")
    wait_for(lambda: len(browser.find_elements(
        By.CSS_SELECTOR, '[data-testid="results"] li img[data-loaded="1"]')) == len(cards),
        what="the result thumbnails")
    with probe_file.open("rb") as fh:
        answer = api.post("/v1/galleries/cuhk/query", files={"image": fh},
                          data={"top_k": "10"}).json()["results"]
    shown = [{"image_id": c.get_attribute("data-image-id"),
              "rank": c.find_element(By.CSS_SELECTOR, '[data-field="rank"]').text,
              "score": c.find_element(By.CSS_SELECTOR, '[data-field="score"]').text,
              "person": c.find_element(By.CSS_SELECTOR, '[data-field="person_id"]').text,
              "match": c.get_attribute("data-match") == "1"} for c in cards]
    assert [s["image_id"] for s in shown] == [a["image_id"] for a in answer]
    assert [s["rank"] for s in shown] == [f"#{a['rank']}" for a in answer]
    assert [s["score"] for s in shown] == [f"{a['score']:.3f}" for a in answer]
    assert [s["person"] for s in shown] == [f"person {a['person_id']}" for a in answer]
    assert [s["match"] for s in shown] == [a["person_id"] == probe_person for a in answer]
    assert sum(s["match"] for s in shown) == 2  # both camera-2 images of the probe's person
    for img in browser.find_elements(By.CSS_SELECTOR, '[data-testid="results"] li img'):
        assert browser.execute_script("return arguments[0].naturalWidth", img) > 0
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "console-results.png"))

    # Delete one image from the browse grid, then the gallery.
    victim = browse[0].find_element(By.XPATH, "./..").get_attribute("data-image-id")
    browser.find_element(
        By.CSS_SELECTOR, f'[data-testid="browse"] li[data-image-id="{victim}"] .delete').click()
    browser.switch_to.alert.accept()
    wait_for(lambda: el("gallery-size").text == "11", what="the deletion")
    assert victim not in {x["image_id"] for x in
                          api.get("/v1/galleries/cuhk/images").json()["images"]}
    el("delete-gallery").click()
    browser.switch_to.alert.accept()
    wait_for(lambda: "deleted" in el("message").text, what="the gallery deletion")
    assert api.get("/v1/galleries/cuhk/images").status_code == 404


def test_the_api_docs_render_offline(server, browser):
    from selenium.webdriver.common.by import By

    for page, selector in (("/docs", ".opblock-summary-path"),
                           ("/redoc", '[data-section-id^="tag/"]')):
        browser.get(server.url + page)
        found = wait_for(lambda s=selector: browser.find_elements(By.CSS_SELECTOR, s),
                         what=f"{page} to render")
        assert found
        resources = browser.execute_script(
            "return performance.getEntriesByType('resource')"
            ".map(e => [e.name, e.responseStatus])")
        # Everything that loaded came from the service; ReDoc also asks a CDN for a logo,
        # which the page's content security policy (and here the cut network) refuses.
        loaded = [name for name, status in resources if status]
        assert loaded and all(name.startswith(server.url) for name in loaded), resources
        assert "default-src 'self'" in httpx.get(server.url + page).headers[
            "content-security-policy"]
    browser.get(server.url + "/docs")
    paths = wait_for(lambda: [e.text for e in browser.find_elements(
        By.CSS_SELECTOR, ".opblock-summary-path")], what="the route list")
    assert "/v1/galleries/{gallery}/query" in {p.replace("\u200b", "") for p in paths}


def test_images_dropped_on_the_page_are_listed_with_ids_from_their_names(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    browser.find_element(By.CSS_SELECTOR, '[data-testid="new-gallery-name"]').send_keys("drop")
    browser.find_element(By.CSS_SELECTOR, '[data-testid="create-gallery"]').click()
    # A real drop event carrying two PNG files drawn in the page (the browser cannot be made
    # to drag files from disk headless) and a text file, which the console leaves out.
    browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const canvas = document.createElement("canvas");
        canvas.width = 32; canvas.height = 64;
        canvas.getContext("2d").fillRect(0, 0, 16, 32);
        canvas.toBlob((blob) => {
          const dt = new DataTransfer();
          dt.items.add(new File([blob], "0042_c3_a.png", {type: "image/png"}));
          dt.items.add(new File([blob], "0043_x.png", {type: "image/png"}));
          dt.items.add(new File(["not an image"], "notes.txt", {type: "text/plain"}));
          const zone = document.querySelector('[data-testid="upload-drop"]');
          zone.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true,
                                                    cancelable: true}));
          done();
        }, "image/png");
    """)
    rows = browser.find_elements(By.CSS_SELECTOR, '[data-testid="upload-table"] tbody tr')
    ids = [[r.find_element(By.CSS_SELECTOR, f'input[data-field="{f}"]').get_attribute("value")
            for f in ("person", "camera")] for r in rows]
    assert ids == [["0042", "3"], ["0043", "1"]]  # camera from "c3", else the default 1
    assert browser.find_element(By.CSS_SELECTOR, '[data-testid="upload"]').is_enabled()
