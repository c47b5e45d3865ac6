"""The web map at ``GET /`` in a real browser (Debian's headless Chromium driven by Selenium).

It proves the page draws the ``osbs`` layer's tiles (a screenshot whose map area holds the
colours of the height ramp), that a click shows the same height as ``GET /point`` for the place
clicked, that a polygon drawn with the mouse shows the statistics ``POST /statistics`` gives for
that polygon, and that API failures are shown as text. Screenshots and the browser console go to
``$CANOPY_TEST_ARTIFACTS`` (default ``test-artifacts/`` in the checkout).
"""

from __future__ import annotations

import io
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parents[2]
LAYER = "osbs"
RESCALE = "0,40"
#: software WebGL (SwiftShader through ANGLE): no GPU, no display, no sandbox (root in CI)
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--window-size=1280,900",
    "--force-device-scale-factor=1",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-extensions",
)
WAIT_S = 30
#: a map pixel counts as a ramp colour within this RGB distance of the interpolated ramp
RAMP_TOLERANCE = 40.0

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium chromium-driver)"
)


# ---------------------------------------------------------------- helpers


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("CANOPY_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def http_json(url: str, body: dict | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of a GET, or of a POST when ``body`` is given; 4xx/5xx included."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def wait_for(driver, script: str, what: str, timeout: float = WAIT_S):
    """Wait until the JavaScript expression ``script`` is truthy; return its value."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
            lambda d: d.execute_script("return " + script))
    except TimeoutException:
        errors = driver.execute_script("return window.canopyApp ? window.canopyApp.errors : null")
        save_console(driver, "timeout")
        pytest.fail(f"timed out after {timeout} s waiting for {what}; page errors: {errors}")


def save_console(driver, name: str) -> None:
    try:
        entries = driver.get_log("browser")
    except Exception as err:  # a driver without the log endpoint
        entries = [{"message": f"(no browser log: {err})"}]
    with open(artifacts_dir() / f"webmap-console-{name}.log", "a") as f:
        for entry in entries:
            f.write(f"{entry.get('level', '')} {entry.get('message', '')}\n")


def page_errors(driver) -> list[str]:
    return driver.execute_script("return window.canopyApp.errors.slice()")


def open_map(driver, base_url: str, query: str = "") -> None:
    """Load the page and wait until the ``osbs`` layer is chosen, fitted and drawn."""
    driver.get(base_url + "/" + query)
    wait_for(driver, "document.querySelectorAll('#layer-select option[value]:not([value=\"\"])').length > 0",
             "the layer list")
    from selenium.webdriver.support.ui import Select

    select = Select(driver.find_element("id", "layer-select"))
    if select.first_selected_option.get_attribute("value") != LAYER:
        select.select_by_value(LAYER)
    wait_for(driver, f"document.body.dataset.ready === '{LAYER}' && window.canopyMap.areTilesLoaded()",
             f"layer {LAYER} drawn")


def map_rect(driver) -> dict:
    return driver.execute_script(
        "const r = document.getElementById('map').getBoundingClientRect();"
        "return {left: r.left, top: r.top, width: r.width, height: r.height};")


def screen_point(driver, lon: float, lat: float) -> tuple[float, float]:
    """Viewport coordinates (CSS px) of a place on the map."""
    x, y = driver.execute_script(
        "const p = window.canopyMap.project([arguments[0], arguments[1]]);"
        "const r = window.canopyMap.getCanvas().getBoundingClientRect();"
        "return [r.left + p.x, r.top + p.y];", lon, lat)
    return x, y


def click_at(driver, x: float, y: float, double: bool = False) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    chain = ActionChains(driver)
    builder = ActionBuilder(driver)
    builder.pointer_action.move_to_location(int(round(x)), int(round(y)))
    if double:
        builder.pointer_action.double_click()
    else:
        builder.pointer_action.click()
    chain.w3c_actions = builder
    chain.perform()


def ramp_colours(stops: list) -> np.ndarray:
    """The colour ramp between the colormap's stops, linearly interpolated (256 × RGB)."""
    values = np.array([s[0] for s in stops], dtype=float)
    rgb = np.array([[int(s[1][i:i + 2], 16) for i in (1, 3, 5)] for s in stops], dtype=float)
    t = np.linspace(values[0], values[-1], 256)
    return np.stack([np.interp(t, values, rgb[:, c]) for c in range(3)], axis=1)


def distance_to_ramp(colours: np.ndarray, ramp: np.ndarray) -> np.ndarray:
    out = np.empty(len(colours))
    for start in range(0, len(colours), 4096):
        chunk = colours[start:start + 4096].astype(float)
        out[start:start + 4096] = np.sqrt(((chunk[:, None, :] - ramp[None]) ** 2).sum(-1)).min(1)
    return out


def css_rgb(driver, colour: str) -> np.ndarray:
    """A CSS colour as the browser resolves it, as RGB."""
    text = driver.execute_script(
        "const s = document.createElement('span'); s.style.color = arguments[0];"
        "document.body.appendChild(s); const c = getComputedStyle(s).color; s.remove(); return c;", colour)
    return np.array([float(v) for v in text[text.index("(") + 1:text.index(")")].split(",")[:3]])


def inner_points(layer: dict, n: int = 5):
    """Places spread over the inner part of the layer's bounds (lon, lat)."""
    w, s, e, nth = layer["bounds"]
    for fy in np.linspace(0.3, 0.7, n):
        for fx in np.linspace(0.3, 0.7, n):
            yield w + fx * (e - w), s + fy * (nth - s)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser():
    if not CHROMEDRIVER.exists():
        pytest.fail(f"Chromium is installed but {CHROMEDRIVER} is not: apt-get install chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: Selenium Manager is never run, nothing is downloaded
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(live_server):
    status, answer = http_json(live_server.url + "/layers")
    assert status == 200, answer
    layers = {layer["id"]: layer for layer in answer["layers"]}
    assert LAYER in layers, f"the live server has no layer {LAYER!r}: {sorted(layers)}"
    return live_server.url, layers


# ---------------------------------------------------------------- tests


def test_map_shows_the_layer_tiles_and_a_legend(browser, server):
    from PIL import Image
    from selenium.webdriver.support.ui import Select

    base, layers = server
    open_map(browser, base)

    # the switcher lists every layer of /layers, and the map is fitted to the chosen one
    options = browser.execute_script(
        "return [...document.querySelectorAll('#layer-select option')].map(o => o.value)")
    assert options == list(layers)
    # to another layer (when the server has one) and back: each time fitted, alone on the map
    others = [layer_id for layer_id in layers if layer_id != LAYER]
    for layer_id in others[:1] + [LAYER]:
        if others:  # (with one layer, it is already chosen)
            Select(browser.find_element("id", "layer-select")).select_by_value(layer_id)
        wait_for(browser, f"document.body.dataset.ready === '{layer_id}' && window.canopyMap.areTilesLoaded()",
                 f"layer {layer_id} drawn")
        w, s, e, n = layers[layer_id]["bounds"]
        view = browser.execute_script("return window.canopyMap.getBounds().toArray()")
        assert view[0][0] <= w and view[0][1] <= s and view[1][0] >= e and view[1][1] >= n, (view, layer_id)
        visible = browser.execute_script(
            "return window.canopyMap.getStyle().layers"
            ".filter(l => l.type === 'raster' && (l.layout || {}).visibility !== 'none').map(l => l.id)")
        assert visible == [f"layer-{layer_id}"]

    # legend in metres from /colormaps
    status, cmap = http_json(f"{base}/colormaps/canopy?rescale={RESCALE}")
    assert status == 200, cmap
    wait_for(browser, "document.querySelectorAll('#legend-labels span').length >= 2", "the legend")
    labels = browser.execute_script(
        "return [...document.querySelectorAll('#legend-labels span')].map(s => s.textContent)")
    assert labels[0] == f"{cmap['stops'][0][0]:g}" and labels[-1].startswith(f"{cmap['stops'][-1][0]:g}"), labels
    assert browser.find_element("id", "legend-units").text == f"({cmap['units']})" == "(m)"

    png = browser.get_screenshot_as_png()
    (artifacts_dir() / "webmap.png").write_bytes(png)
    save_console(browser, "tiles")
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    scale = browser.execute_script("return window.devicePixelRatio")
    r = map_rect(browser)
    top, left = int(r["top"] * scale), int(r["left"] * scale)
    area = image[top:top + int(r["height"] * scale), left:left + int(r["width"] * scale)]
    assert area.size, (r, image.shape)

    ramp = ramp_colours(cmap["stops"])
    background = css_rgb(browser, browser.execute_script(
        "return window.canopyMap.getPaintProperty('background', 'background-color')"))
    # the check means something only if the empty map is not itself a ramp colour
    assert distance_to_ramp(background[None], ramp)[0] > 2 * RAMP_TOLERANCE, background

    colours, counts = np.unique(area.reshape(-1, 3), axis=0, return_counts=True)
    on_ramp = distance_to_ramp(colours, ramp) <= RAMP_TOLERANCE
    share = counts[on_ramp].sum() / counts.sum()
    assert share > 0.10, f"only {share:.1%} of the map area is drawn in ramp colours (see webmap.png)"
    assert on_ramp.sum() >= 10, "the layer is drawn in fewer than 10 ramp colours: not a height map"
    assert page_errors(browser) == []


def test_click_shows_the_height_that_point_returns(browser, server):
    base, layers = server
    layer = layers[LAYER]
    open_map(browser, base)

    # a place with a height (the layer may have no-data holes)
    for lon, lat in inner_points(layer):
        status, answer = http_json(f"{base}/layers/{LAYER}/point?" + urllib.parse.urlencode({"lon": lon, "lat": lat}))
        if status == 200 and answer.get("height") is not None:
            break
    else:
        pytest.fail(f"no place with a height inside the middle of layer {LAYER}")

    x, y = screen_point(browser, lon, lat)
    click_at(browser, x, y)
    wait_for(browser, "['value', 'nodata', 'error'].includes(document.getElementById('point-panel').dataset.state)",
             "the height at the click")
    panel = browser.find_element("id", "point-panel")
    clicked_lon = float(panel.get_attribute("data-lon"))
    clicked_lat = float(panel.get_attribute("data-lat"))
    # the page asked for the place under the mouse (within a pixel or two of the target)
    px = browser.execute_script(  # degrees of longitude per CSS pixel (more than of latitude)
        "return window.canopyMap.unproject([1, 0]).lng - window.canopyMap.unproject([0, 0]).lng")
    assert abs(clicked_lon - lon) < 3 * px and abs(clicked_lat - lat) < 3 * px

    status, expected = http_json(f"{base}/layers/{LAYER}/point?"
                                 + urllib.parse.urlencode({"lon": repr(clicked_lon), "lat": repr(clicked_lat)}))
    assert status == 200, expected
    shown = browser.find_element("id", "height-value")
    assert panel.get_attribute("data-state") == "value", (shown.text, page_errors(browser))
    assert float(shown.get_attribute("data-value")) == expected["height"]
    number, units = shown.text.split()
    assert units == "m" and abs(float(number) - expected["height"]) <= 0.05 + 1e-9, shown.text
    popup = browser.find_element("css selector", ".maplibregl-popup-content")
    assert number in popup.text

    # a click outside the layer says "no data" instead of failing silently
    r = map_rect(browser)
    click_at(browser, r["left"] + 8, r["top"] + r["height"] / 2)  # in the fit's padding, off the controls
    wait_for(browser, "document.getElementById('point-panel').dataset.state === 'nodata'",
             "'no data' for a click outside the layer")
    assert browser.find_element("id", "height-value").text == "no data"
    assert "no data" in browser.find_element("css selector", ".maplibregl-popup-content").text
    assert page_errors(browser) == []


def draw_polygon(browser, vertices, finish: str) -> dict:
    browser.find_element("id", "draw-button").click()
    wait_for(browser, "document.body.dataset.drawing === 'true'", "drawing mode")
    for i, (lon, lat) in enumerate(vertices):
        x, y = screen_point(browser, lon, lat)
        click_at(browser, x, y, double=finish == "double-click" and i == len(vertices) - 1)
    if finish == "button":
        browser.find_element("id", "finish-button").click()
    wait_for(browser, "['done', 'error'].includes(document.getElementById('stats-panel').dataset.state)",
             "the polygon statistics")
    panel = browser.find_element("id", "stats-panel")
    assert panel.get_attribute("data-state") == "done", (panel.text, page_errors(browser))
    return browser.execute_script("return window.canopyApp.lastStatistics.polygon")


@pytest.mark.parametrize("finish", ["double-click", "button"])
def test_drawn_polygon_shows_the_statistics_of_the_api(browser, server, finish):
    base, layers = server
    w, s, e, n = layers[LAYER]["bounds"]
    open_map(browser, base)

    fractions = [(0.25, 0.25), (0.75, 0.3), (0.7, 0.75), (0.3, 0.7)]
    if finish == "button":
        fractions = fractions[:3]
    vertices = [(w + fx * (e - w), s + fy * (n - s)) for fx, fy in fractions]
    polygon = draw_polygon(browser, vertices, finish)
    (artifacts_dir() / f"webmap-polygon-{finish}.png").write_bytes(browser.get_screenshot_as_png())
    save_console(browser, "polygon")

    ring = polygon["geometry"]["coordinates"][0]
    assert polygon["geometry"]["type"] == "Polygon"
    # one vertex per click (a double-click adds one), closed
    assert len(ring) == len(vertices) + 1 and ring[0] == ring[-1], ring

    status, answer = http_json(f"{base}/layers/{LAYER}/statistics", polygon)
    assert status == 200, answer
    expected = answer["features"][0]
    expected = expected.get("properties", expected) if "mean" not in expected else expected
    for key in ("mean", "median", "p95", "area_m2"):
        cell = browser.find_element("id", f"stat-{key}")
        assert float(cell.get_attribute("data-value")) == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key
    mean_text = browser.find_element("id", "stat-mean").text
    assert mean_text == f"{expected['mean']:.2f} m" or abs(float(mean_text.split()[0]) - expected["mean"]) <= 0.006
    panel_text = browser.find_element("id", "stats-panel").text
    for label in ("Mean height", "Median height", "95th percentile", "Canopy cover", "Area"):
        assert label in panel_text
    assert page_errors(browser) == []


def test_api_errors_are_shown_as_text(browser, server):
    base, _ = server
    browser.get(base + "/?colormap=no-such-colormap")
    wait_for(browser, "window.canopyApp && window.canopyApp.errors.some(e => e.startsWith('legend:'))",
             "the legend's error")
    box = browser.find_element("id", "error-box")
    assert box.is_displayed() and box.text.strip()
    legend_error = next(e for e in page_errors(browser) if e.startswith("legend:"))
    assert "/colormaps/no-such-colormap: 4" in legend_error, legend_error
