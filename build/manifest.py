"""Writes the build manifest (JSON, stdout) for a frozen binary: what went in, and the digests to pin.

    {"build": {...versions, flags, python, pyinstaller, source commit...},
     "binary": {"name", "sha256", "size"},
     "model": {"name", "sha256", "size"} | null}

`attestation.policy.Policy.from_manifest` reads `binary.sha256` and `model.sha256`. The manifest holds no
time, host name or path, so two reproducible builds give byte-identical manifests too.
Run with the build venv's interpreter (build/build.sh does).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def appliance_version() -> str:
    ns: dict = {}
    exec((ROOT / "appliance" / "__init__.py").read_text(), ns)
    return ns["__version__"]


# Same set as build/appliance.spec leaves out of the CUDA bundle.
HOST_LIBS = re.compile(
    r"^lib(cuda|cudart|cublas|cublasLt|nvrtc|nvrtc-builtins|nvidia-[a-z-]+|nvJitLink|cufft|curand|cusparse)\.so"
)


def _llama_lib_dir() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("llama_cpp").submodule_search_locations[0]) / "lib"


def llama_libraries() -> dict[str, str]:
    """SHA-256 of each llama.cpp library the binary bundles (llama_cpp/lib), by file name."""
    return {p.name: sha256(p) for p in sorted(_llama_lib_dir().glob("lib*.so*")) if p.is_file()}


def host_libraries() -> list[str]:
    """The NVIDIA libraries llama.cpp's libraries link that the host must provide (from their DT_NEEDED)."""
    lib = _llama_lib_dir()
    needed: set[str] = set()
    for p in sorted(lib.glob("lib*.so*")):
        out = subprocess.run(["readelf", "-d", "-W", str(p)], capture_output=True, text=True).stdout
        needed.update(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out))
    return sorted(n for n in needed if HOST_LIBS.match(n))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", required=True, choices=["cpu", "cuda"])
    ap.add_argument("--binary", required=True, type=Path)
    ap.add_argument("--wheel", required=True, type=Path)
    ap.add_argument("--model", default="")
    ap.add_argument("--model-name", default="")
    args = ap.parse_args()

    flags_file = args.wheel.parent / "FLAGS"
    llama_flags = flags_file.read_text().split() if flags_file.is_file() else []
    packages = {
        d.metadata["Name"].lower().replace("_", "-"): d.version
        for d in md.distributions()
        if d.metadata["Name"]
    }
    build = {
        "appliance": appliance_version(),
        "variant": args.variant,
        "source_commit": os.environ.get("APPLIANCE_SOURCE_COMMIT", "unknown"),
        "source_dirty": os.environ.get("APPLIANCE_SOURCE_DIRTY", "0") == "1",
        "source_date_epoch": int(os.environ.get("SOURCE_DATE_EPOCH", "0")),
        "pythonhashseed": os.environ.get("PYTHONHASHSEED"),
        "python": {
            "version": platform.python_version(),
            "implementation": sys.implementation.name,
            "compiler": platform.python_compiler(),
        },
        "platform": f"{platform.system().lower()}-{platform.machine()}",
        "pyinstaller": md.version("pyinstaller"),
        "pyinstaller_options": {
            "onefile": True,
            "compress_binaries": os.environ.get("APPLIANCE_COMPRESS_BINARIES", "0") == "1",
            "strip": "debug sections only",
            "upx": False,
            "runtime_tmpdir": None,
        },
        "llama_cpp_python": {
            "version": md.version("llama_cpp_python"),
            # The libraries, not the wheel: the wheel's lib/pkgconfig/llama.pc names scikit-build-core's
            # random staging directory, so two compiles give byte-identical libraries in different wheels.
            "libraries": llama_libraries(),
            "cmake_flags": llama_flags,
            # Fixes applied to the pinned source before compiling (scripts/patches; each says why).
            "patches": {q.name: sha256(q) for q in sorted((ROOT / "scripts" / "patches").glob("*.patch"))},
            # Runtime CPU dispatch: ggml-cpu once per x86 level, the best this CPU runs loaded at start.
            "cpu_backends": sorted(
                p.name[len("libggml-cpu-") : -len(".so")] for p in _llama_lib_dir().glob("libggml-cpu-*.so")
            ),
        },
        "locks": {
            "requirements.lock": sha256(ROOT / "requirements.lock"),
            "build/requirements-build.lock": sha256(ROOT / "build" / "requirements-build.lock"),
        },
        "packages": dict(sorted(packages.items())),
    }
    if args.variant == "cuda":
        build["host_libraries"] = host_libraries()
    model = None
    if args.model:
        mp = Path(args.model)
        model = {"name": args.model_name or mp.stem, "sha256": sha256(mp), "size": mp.stat().st_size}
    manifest = {
        "build": build,
        "binary": {"name": args.binary.name, "sha256": sha256(args.binary), "size": args.binary.stat().st_size},
        "model": model,
    }
    json.dump(manifest, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
