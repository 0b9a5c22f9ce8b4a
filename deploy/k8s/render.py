"""Render each kustomization with `kubectl kustomize` into deploy/k8s/rendered/NAME.yaml (committed, so a
reviewer and the schema tests see exactly what is applied).

    python deploy/k8s/render.py           # rewrite the rendered files
    python deploy/k8s/render.py --check   # exit 1 naming the files that differ from a fresh render
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = {"base": HERE / "base", "confidential": HERE / "overlays" / "confidential"}
RENDERED = HERE / "rendered"
HEADER = "# Rendered by deploy/k8s/render.py from {source} with `kubectl kustomize`: do not edit.\n"


def render(name: str, kubectl: str = "kubectl") -> str:
    source = TARGETS[name]
    out = subprocess.run([kubectl, "kustomize", str(source)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {source} exited {out.returncode}: {out.stderr.strip()}")
    return HEADER.format(source=source.relative_to(HERE.parent.parent).as_posix()) + out.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    args = p.parse_args(argv)
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print("render.py: kubectl is not installed (it carries kustomize)", file=sys.stderr)
        return 2
    stale = []
    for name in TARGETS:
        text = render(name, kubectl)
        path = RENDERED / f"{name}.yaml"
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print("render.py: stale, run `python deploy/k8s/render.py`: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
