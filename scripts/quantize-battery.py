#!/usr/bin/env python3
"""The quantization battery: the real model (Gemma 3 270M Q4_K_M) re-quantized into the other types
llama.cpp serves, with llama.cpp's own quantizer through the bindings, once, cached outside the repo.

    .venv/bin/python scripts/quantize-battery.py [SOURCE.gguf] [--types Q4_0,F16] [--threads N]

SOURCE defaults to the model scripts/real-model.sh fetches. Writes
`$APPLIANCE_CACHE/models/battery/<source sha256[:16]>-llama<version>/gemma-3-270m-<type>.gguf` (the key is
the source's digest and the quantizer's version: either changing makes new files), each through a
temporary file renamed into place, with its sha256 beside it (`.sha256`), checked every time it is used.
A file already there is kept. Prints one JSON object {type: path} on stdout, the source itself as
"Q4_K_M"; progress and timings go to stderr.

Requantizing from Q4_K_M (allow_requantize) does not recover what Q4_K_M lost: the battery checks that
every type loads and generates on every CPU build, not the quality of each type.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from appliance.digests import file_sha256

HERE = Path(__file__).resolve().parent
SOURCE_TYPE = "Q4_K_M"
TYPES = ("Q4_0", "Q5_K_M", "Q6_K", "Q8_0", "IQ4_NL", "F16")
_FTYPES = {  # our names -> llama_cpp's LLAMA_FTYPE_* constant names
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "IQ4_NL": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
}


def cache_root() -> Path:
    explicit = os.environ.get("APPLIANCE_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "appliance"


def real_model() -> Path:
    done = subprocess.run([str(HERE / "real-model.sh")], env={**os.environ, "PYTHON": sys.executable},
                          stdout=subprocess.PIPE, text=True, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


def _verified(path: Path) -> bool:
    digest = path.with_name(path.name + ".sha256")
    if not (path.is_file() and digest.is_file()):
        return False
    if file_sha256(path) == digest.read_text().split()[0]:
        return True
    print(f"{path} does not match its recorded sha256: quantizing it again", file=sys.stderr)
    return False


_GGML_LOG_WARN = 3  # ggml_log_level: ... WARN = 3, ERROR = 4, CONT = 5


def _quiet_llama() -> None:
    """llama.cpp's errors and summary warnings only: the quantizer otherwise logs a line per tensor."""
    import llama_cpp

    C = llama_cpp.llama_cpp
    last = [0]

    @C.llama_log_callback
    def log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level != 5:
            last[0] = level
        line = text.decode("utf-8", "replace")
        # Errors, and the quantizer's own summary; not its per-tensor fallback notes.
        if last[0] > _GGML_LOG_WARN or (last[0] == _GGML_LOG_WARN and line.startswith("llama_model_quantize")):
            sys.stderr.write(line)

    _quiet_llama.callback = log  # kept alive as long as llama.cpp may call it
    C.llama_log_set(log, ctypes.c_void_p(0))


def quantize(source: Path, out: Path, qtype: str, threads: int) -> float:
    """llama_model_quantize into a temporary file in out's directory, then rename; returns seconds."""
    import llama_cpp

    C = llama_cpp.llama_cpp
    params = C.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _FTYPES[qtype])
    params.allow_requantize = True
    params.nthread = threads
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    t0 = time.monotonic()
    try:
        rc = C.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({qtype}) returned {rc}")
        tmp.with_name(tmp.name + ".sha256").write_text(f"{file_sha256(tmp)}  {out.name}\n")
        # The digest first: a model in place always has its digest beside it.
        os.replace(tmp.with_name(tmp.name + ".sha256"), out.with_name(out.name + ".sha256"))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".sha256").unlink(missing_ok=True)
    return time.monotonic() - t0


def battery(source: Path, types: list[str], threads: int) -> dict[str, str]:
    import llama_cpp

    _quiet_llama()
    src_sha = file_sha256(source)
    out_dir = cache_root() / "models" / "battery" / f"{src_sha[:16]}-llama{llama_cpp.__version__}"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = source.name.removesuffix(".gguf")
    stem = stem[: -len(SOURCE_TYPE)].rstrip("-_.") if stem.upper().endswith(SOURCE_TYPE) else stem
    paths = {SOURCE_TYPE: str(source)}
    for qtype in types:
        if qtype == SOURCE_TYPE:
            continue
        out = out_dir / f"{stem}-{qtype.lower()}.gguf"
        if not _verified(out):
            print(f"quantizing {source.name} -> {qtype} ({threads} threads) ...", file=sys.stderr, flush=True)
            secs = quantize(source, out, qtype, threads)
            print(f"  {qtype}: {secs:.1f} s, {out.stat().st_size / 1e6:.0f} MB -> {out}", file=sys.stderr, flush=True)
        paths[qtype] = str(out)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", nargs="?", type=Path, help="the Q4_K_M GGUF (default: scripts/real-model.sh)")
    ap.add_argument("--types", default=",".join(TYPES), help=f"comma-separated, of {', '.join(_FTYPES)}")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in _FTYPES]
    if unknown:
        ap.error(f"unknown type(s) {', '.join(unknown)}; known: {', '.join(_FTYPES)}")
    source = (args.source or real_model()).resolve()
    print(json.dumps(battery(source, types, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
