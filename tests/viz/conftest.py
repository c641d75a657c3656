"""The viewer tests' shared fixture: one headless Chromium per test module (viz/browser.py)."""

from __future__ import annotations

import pytest

from tests.viz import browser as chromium


@pytest.fixture(scope="module")
def browser():
  """A headless Chromium webdriver for the module's browser tests (skipped without one)."""
  yield from chromium.chromium()
