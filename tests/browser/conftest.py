"""Browser tier: the web chat in a real Chromium (Debian's), driven by Playwright, against a real
appliance started with the integration tier's fixtures (imported here, so this directory runs alone).

Fixtures: `chat_server` (module): the appliance with the test model and simulated attestation;
`browser_factory`: launches /usr/bin/chromium with a fresh user-data-dir and extra flags; every
browser it launched is closed at the end. Without chromium or the playwright package, the tests skip
and say why.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import (  # noqa: F401  (fixtures, re-exported for this directory)
    model_files,
    pytest_runtest_makereport,
    start_server,
)

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHAT_CONFIG = """
[attestation]
provider = "simulated"
rate_per_minute = 0
"""


@pytest.fixture(scope="module")
def chat_server(start_server, model_files):  # noqa: F811  (the imported fixtures)
    return start_server(models={"m": model_files.main}, config=CHAT_CONFIG, name="webchat")


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (Debian's chromium package; scripts/system-deps.sh installs it as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (requirements.lock)")
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser_factory(playwright) -> Iterator[Any]:
    """launch(*extra_flags) -> a BrowserContext with its own fresh user-data-dir."""
    opened: list[tuple[Any, str]] = []

    def launch(*extra: str) -> Any:
        profile = tempfile.mkdtemp(prefix="chromium-profile-")
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=[*FLAGS, *extra],
            viewport={"width": 1100, "height": 720},
        )
        opened.append((context, profile))
        return context

    yield launch
    for context, profile in opened:
        context.close()
        shutil.rmtree(profile, ignore_errors=True)
