"""The viewer tests' headless Chromium: starting it (the `browser` fixture of tests/viz/conftest.py)
and opening a page in it.

selenium drives Debian's `chromium` with `chromium-driver`; without either (or without selenium,
or where the browser cannot start) the browser tests skip, with the reason.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest


def browser_paths() -> tuple[str | None, str | None]:
  """(the Chromium binary, chromedriver), each None where it is not on PATH."""
  chrome = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))
                 if p), None)
  return chrome, shutil.which("chromedriver")


def chromium() -> Iterator:
  """Yield a headless Chromium webdriver (1400x1000, scale 1, the console log kept) and quit it
  afterwards; pytest.skip where selenium, the browser or its driver is missing or cannot start."""
  webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
  from selenium.webdriver.chrome.service import Service
  chrome, driver_path = browser_paths()
  if not chrome or not driver_path:
    pytest.skip("no headless browser: install Debian's chromium and chromium-driver")
  opts = webdriver.ChromeOptions()
  opts.binary_location = chrome
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1400,1000", "--force-device-scale-factor=1", "--hide-scrollbars",
              "--disable-extensions", "--no-first-run", "--disable-background-networking"):
    opts.add_argument(arg)
  opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  try:
    driver = webdriver.Chrome(options=opts, service=Service(driver_path))
  except Exception as e:  # a browser that cannot start here (sandbox, display, version mismatch)
    pytest.skip(f"chromium did not start: {type(e).__name__}: {str(e).splitlines()[0]}")
  driver.set_script_timeout(30)
  yield driver
  driver.quit()


def open_page(driver, path) -> None:
  """Load the page at `path` in `driver`; assert that it says it is ready and logged no error or
  warning to the console."""
  driver.get_log("browser")  # drop earlier pages' messages
  driver.get("file://" + os.path.abspath(path))
  assert driver.execute_script("return document.body.dataset.ready") == "1"
  errors = [m for m in driver.get_log("browser") if m["level"] in ("SEVERE", "WARNING")]
  assert not errors, errors
