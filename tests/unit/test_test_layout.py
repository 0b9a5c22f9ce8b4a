"""The suite's own layout: pytest (rootdir-relative imports, no packages) needs every test module's
basename unique across tests/, or a full run stops at collection (a per-directory run does not show it)."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_basenames_are_unique():
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []
