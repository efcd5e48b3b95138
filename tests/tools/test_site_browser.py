"""`prapa site`'s live view in a real browser: Debian's headless Chromium driven by Selenium.

The page must list every device (meters, one doser, a catchment of drains), show an alarm and draw a
chart from live data, the doser's one per charted field with its band and ceiling, and, in the storm
the site runs, the partly blocked drain first on its catchment's list and red on its map;
a screenshot is kept in artifacts/ (CI uploads that folder)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocol.roles import doser
from tools.sim.worlds.drain import SITE_CATCHMENT

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("PRAPA_ARTIFACTS", ROOT / "artifacts"))
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver "
                                                           "(./dev setup installs them)")
def test_the_status_page_shows_devices_an_alarm_and_live_charts(tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    report = tmp_path / "report.json"
    site = subprocess.Popen([sys.executable, "-m", "tools.cli", "site", "--headless", "--boards", "8", "--speed", "120",
                             "--duration", "150", "--workdir", str(tmp_path / "site"), "--report", str(report)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    driver = None
    try:
        url = None
        for line in site.stdout:
            event = json.loads(line)
            if event["event"] == "gateway_started":
                url = event["status_page"]
                break
        assert url, site.stderr.read()
        driver = _browser()
        deadline = time.monotonic() + 20
        while True:
            try:
                driver.get(url)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        # The page redraws from a poll every 2 s: an element found a moment ago may be gone (stale); look again.
        wait = WebDriverWait(driver, 60, poll_frequency=0.5, ignored_exceptions=(StaleElementReferenceException,))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#devices tr[data-device]")) == 8)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr.alarm.active"))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "svg.chart polyline")) >= 3)
        names = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#devices tr[data-device]")]
        assert all(any(f"meter-00{i}" in n for n in names) for i in (1, 2, 3)), names
        # Exactly one doser, charting each of its spec's CHART_FIELDS, the first with band and ceiling.
        dosers = driver.find_elements(By.CSS_SELECTOR, "#devices tr[data-device].role-doser")
        assert len(dosers) == 1 and "doser-001" in dosers[0].text
        assert dosers[0].get_attribute("data-device") == "00002004"
        fields = len(doser.CHART_FIELDS)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.role-doser svg.chart polyline")) == fields)
        assert len(driver.find_elements(By.CSS_SELECTOR, "tr.role-doser svg.chart")) == fields
        assert len(driver.find_elements(By.CSS_SELECTOR, "tr.role-doser svg.chart rect.band")) == 1
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr.role-doser svg.chart line.ceiling"))
        wait.until(lambda d: len(d.find_element(By.CSS_SELECTOR, "tr.role-doser svg.chart polyline")
                                 .get_attribute("points").split()) >= 2)        # a line, for the screenshot
        labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "tr.role-doser .field-name")]
        assert labels[0].startswith(doser.CHART_FIELDS[0]), labels
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.alarm.active")) >= 2)
        alarms = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "tr.alarm.active")]
        assert any("burst" in a and "00002003" in a for a in alarms), alarms
        # the doser's nearly empty tank: the tank_low interlock stopped its pump and shows as an alarm
        wait.until(lambda d: any("tank_low" in e.text and "00002004" in e.text
                                 for e in d.find_elements(By.CSS_SELECTOR, "tr.alarm.active")))
        # The storm: the partly blocked drain (drain-002) heads its catchment's list, in flood colours, and
        # every drain of the street is on the map.
        assert len(driver.find_elements(By.CSS_SELECTOR, "svg.catchment-map circle[data-device]")) == 4
        first = '.catchment[data-catchment="%s"] ol.suspects li[data-rank="1"]' % SITE_CATCHMENT
        WebDriverWait(driver, 120, poll_frequency=1, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, first)
                       if e.get_attribute("data-device") == "00002006"
                       and e.get_attribute("data-state") in ("flood_danger", "blocked")])
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'svg.catchment-map circle[data-device="00002006"]')
                   .get_attribute("data-state") in ("flood_danger", "blocked"))
        ARTIFACTS.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "site-status-page.png"))
    finally:
        if driver is not None:
            driver.quit()
        site.send_signal(signal.SIGTERM)
        site.wait(60)
    data = json.loads(report.read_text())
    assert all(b["readings_at_broker"] > 0 for b in data["boards"]), [(b["id"], b["readings_made"],
                                                                     b["readings_at_broker"]) for b in data["boards"]]
    assert "burst" in data["boards"][2]["alarms"]
    assert "tank_low" in data["boards"][3]["alarms"]
    assert [b["role"] for b in data["boards"]] == ["meter", "meter", "meter", "doser"] + ["drain"] * 4
    assert {"flood_danger", "level_warning"} <= set(data["boards"][5]["alarms"])
    assert data["catchments"][SITE_CATCHMENT][0]["name"] == "drain-002", data["catchments"]   # the crew's first stop
