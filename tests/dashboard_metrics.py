"""The metric families the Grafana dashboard (deploy/grafana/dashboards/appliance.json) queries.

Imported by tests/unit/test_deploy_manifests.py (the dashboard asks only for the families the design
names) and tests/integration/test_dashboard_metrics.py (a real appliance exports every one of them).
Names are as `# TYPE` lines in the Prometheus text format give them: counters with `_total`,
histograms without `_bucket`/`_sum`/`_count`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["DASHBOARD", "DATASOURCE_UID", "dashboard_metric_names", "promql_metric_names", "panels", "expressions"]

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "appliance.json"
DATASOURCE_UID = "appliance-prometheus"

# PromQL words that look like identifiers but name no series.
_KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless",
    "inf", "nan", "start", "end",
})
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
# by (...), without (...), on (...), ignoring (...), group_left (...), group_right (...): label lists
_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w$.:])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"^\s*label_values\s*\(\s*([A-Za-z_:][A-Za-z0-9_:]*)")


def promql_metric_names(expr: str) -> set[str]:
    """The series names an expression selects (functions, keywords, labels and variables left out)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _LABEL_LISTS.sub(" ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    names = set()
    for m in _IDENT.finditer(text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS or re.fullmatch(r"\d.*", word):
            continue
        names.add(word)
    return names


def family(name: str) -> str:
    """A histogram's series (`_bucket`, `_sum`, `_count`) belong to the family without the suffix."""
    for suffix in _HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load(path: Path = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included (rows themselves left out)."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def expressions(dashboard: dict[str, Any]) -> Iterator[str]:
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield target["expr"]


def dashboard_metric_names(path: Path = DASHBOARD) -> set[str]:
    """The metric families every panel expression and template variable query of the dashboard uses."""
    dashboard = load(path)
    names: set[str] = set()
    for expr in expressions(dashboard):
        names |= {family(n) for n in promql_metric_names(expr)}
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        m = _LABEL_VALUES.match(text)
        if m:
            names.add(family(m.group(1)))
        elif text:
            names |= {family(n) for n in promql_metric_names(text)}
    return names
