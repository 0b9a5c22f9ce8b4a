"""The contract tier's fakes (tests/contract/conftest.py: FakeRegistry and its engine), loaded once
for the unit tier's in-process app tests."""

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_contract_fakes", Path(__file__).resolve().parents[1] / "contract" / "conftest.py"
)
_fakes = sys.modules.setdefault("_contract_fakes", importlib.util.module_from_spec(_spec))
if not hasattr(_fakes, "FakeRegistry"):
    _spec.loader.exec_module(_fakes)
FakeRegistry = _fakes.FakeRegistry
