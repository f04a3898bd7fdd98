"""The HTML report in a real browser: the distribution's headless Chromium, driven by Selenium through its
ChromeDriver. At a desktop's width (1280 px) and a phone's (390 px, as a phone lays a page out) nothing
overflows the page sideways, every plot is on the page and visible, and the console shows no error.

CI installs Chromium (``.ci/run``) and sets GRADSCOPE_REQUIRE_BROWSER, so there a missing browser fails
the suite instead of skipping it."""
from __future__ import annotations

import os
import shutil

import pytest

import stored

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("matplotlib")

WIDTHS = {"desktop": 1280, "phone": 390}
RUNS = sorted(path.stem for path in stored.STORED.glob("*.json"))  # every kind of run the goldens hold
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("GRADSCOPE_REQUIRE_BROWSER"):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver: apt-get install chromium "
                    "chromium-driver", pytrace=False)
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)

# What the page's layout says, read in the page: its width against the viewport's, and each plot's box.
LAYOUT = """
const root = document.documentElement;
return {
  viewport: root.clientWidth, inner: window.innerWidth, scroll: root.scrollWidth,
  plots: Array.from(document.querySelectorAll("figure svg")).map(svg => {
    const box = svg.getBoundingClientRect(), style = getComputedStyle(svg);
    return {left: box.left, right: box.right, width: box.width, height: box.height,
            shown: style.display !== "none" && style.visibility === "visible" && style.opacity !== "0"};
  }),
  wide: Array.from(document.body.querySelectorAll("*")).filter(
    e => e.getBoundingClientRect().right > root.clientWidth + 1 && getComputedStyle(e).position !== "fixed"
         && !e.closest("pre, .scroll")).map(e => e.tagName + (e.className ? "." + e.className : "")).slice(0, 5),
};
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # headless, and off the network: none is reachable here, and a report needs none
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """Every stored run's HTML report, written as the CLI's --html writes it."""
    from gradscope.gate import decide
    from gradscope.present.formats import FORMATS
    folder = tmp_path_factory.mktemp("reports")
    out = {}
    for name in RUNS:
        report = stored.load(name)
        path = folder / f"{name}.html"
        path.write_text(FORMATS["html"](report, decide(report, "error")), encoding="utf-8")
        out[name] = path
    return out


@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("name", RUNS)
def test_the_report_fits_the_page_and_shows_every_plot_without_errors(browser, pages, name, width):
    pixels = WIDTHS[width]
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": pixels, "height": 900, "deviceScaleFactor": 1, "mobile": width == "phone"})
    browser.get_log("browser")  # drop what earlier pages logged
    browser.get(pages[name].as_uri())
    layout = browser.execute_script(LAYOUT)
    assert layout["inner"] == pixels  # the page is laid out at the device's width (its viewport meta)
    assert layout["scroll"] <= layout["viewport"], f"overflows sideways: {layout['wide']}"
    html = pages[name].read_text(encoding="utf-8")
    assert len(layout["plots"]) == html.count("<figure>") >= 2
    for plot in layout["plots"]:
        assert plot["shown"] and plot["width"] > 100 and plot["height"] > 50, plot
        assert plot["left"] >= 0 and plot["right"] <= layout["viewport"] + 0.5, plot
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors
