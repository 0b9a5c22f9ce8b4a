"""The walls between the rooms (README, "How it works"), read from the sources' import statements.

Every import counts, also one inside a function: a lazy import crosses a wall just the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "appliance"


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)
    return found


def _sources(room: str) -> list[Path]:
    return sorted((ROOT / room.replace(".", "/")).rglob("*.py"))


def _crossings(room: str, forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for path in _sources(room):
        for name in sorted(_imports(path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                out.append(f"{path.relative_to(ROOT)} imports {name}")
    return out


def test_the_reader_sees_imports_of_every_kind(tmp_path):
    pkg = tmp_path / "appliance" / "engine"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("import a.b\nfrom c import d\nfrom ..web import app\ndef f():\n    from .slots import Slot\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        names = _imports(f)
    finally:
        ROOT = saved
    assert {"a.b", "c", "c.d", "appliance.web", "appliance.web.app", "appliance.engine.slots"} <= names


def test_the_engine_knows_no_http_and_no_trust_or_evidence():
    assert _crossings("appliance.engine", ("appliance.web", "appliance.trust", "appliance.evidence", "falcon",
                                           "gunicorn")) == []


@pytest.mark.parametrize("room", ["appliance.trust", "appliance.evidence"])
def test_trust_and_evidence_do_not_reach_into_the_web(room):
    assert _crossings(room, ("appliance.web", "falcon", "gunicorn")) == []


def test_only_the_web_package_imports_falcon_and_gunicorn():
    outside = [p for p in PACKAGE.rglob("*.py") if (PACKAGE / "web") not in p.parents]
    found = []
    for path in outside:
        for name in _imports(path):
            if name.split(".")[0] in ("falcon", "gunicorn"):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    assert found == []


def test_the_verifier_imports_nothing_from_the_server():
    assert _crossings("attestation", ("appliance", "llama_cpp", "falcon", "gunicorn", "gevent")) == []


def test_the_model_generator_is_not_in_the_package():
    assert not (PACKAGE / "modelgen.py").exists()
    assert (ROOT / "tools" / "modelgen.py").is_file()
