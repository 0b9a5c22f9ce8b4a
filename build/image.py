"""Writes the appliance's container image, an OCI image layout, from the frozen binary: no daemon, no network.

    python build/image.py [--variant cpu|cuda] [--binary dist/appliance] [--layout DIR] [--archive FILE.tar]
                          [--sbom FILE.spdx.json] [--revision SHA] [--source URL] [--tag TAG]

(`make image`, `make image-cuda`.) Writes, for variant V (cpu unless told):
  dist/image/appliance-V/          OCI image layout (oci-layout, index.json, blobs/sha256/...), tag <version>-V
  dist/appliance-V.oci.tar         the same layout as one tar (`skopeo copy oci-archive:...`, `podman load -i`)
  dist/appliance-V.sbom.spdx.json  SPDX 2.3 SBOM, also in the image at /usr/share/doc/appliance/sbom.spdx.json
and prints the image's manifest digest and sizes.

What is in it: one layer, no base image, no shell. The frozen binary at /usr/local/bin/appliance; the
host's glibc and zlib objects it needs (its ELF interpreter and DT_NEEDED entries, and those of every
library in its archive that the archive does not carry itself, read from the binary; the CUDA variant
adds the CUDA runtime and cuBLAS of the pinned toolkit the binary was compiled with); the CA bundle
(/etc/ssl/certs/ca-certificates.crt, SSL_CERT_FILE); /etc/passwd and /etc/group with the non-root user
`appliance` (65532:65532) the image runs as; the Debian copyright files of what was copied; the build
manifest and the SBOM. Run it with a read-only root and a tmpfs on /tmp that allows exec: the one-file
binary unpacks itself (184 MB with the demo model embedded) into $TMPDIR=/tmp at every start and maps
the libraries from there (`docker run --read-only --tmpfs /tmp:exec,size=512m`; Docker's tmpfs is noexec
unless told).

CUDA variant: the NVIDIA container toolkit mounts the driver (libcuda.so.1, libnvidia-ptxjitcompiler.so.1,
libnvidia-ml.so.1, nvidia-smi, the /dev/nvidia* nodes) as NVIDIA_VISIBLE_DEVICES and
NVIDIA_DRIVER_CAPABILITIES=compute,utility ask; NVIDIA_REQUIRE_CUDA makes it refuse a driver too old for
the runtime. The driver must match the host's kernel module, so it is never in the image; the toolkit does
not provide the CUDA runtime or cuBLAS, so the image carries those, the pinned versions the binary was
compiled against (scripts/cuda-toolkit.sh's cache, or --cuda-runtime DIR).

Reproducible: the same binary, host libraries, SOURCE_DATE_EPOCH and options give the same bytes, so the
same manifest digest. Every tar header is set here (mtime SOURCE_DATE_EPOCH, uid/gid 0, no user or group
names, USTAR: no pax headers, no atime/ctime), entries sorted, gzip with mtime 0 and no file name, JSON
with sorted keys, `created` = SOURCE_DATE_EPOCH (default: the build manifest's). The gzip bytes depend on
zlib's version, so pin the build machine as for the binary itself.

Why a writer of our own and not umoci: Debian's umoci 0.4.7 `insert` keeps the mtimes and makes the same
digest twice, but its layer ends without the tar end-of-archive blocks (the last member is not even
padded), which GNU tar rejects ("Unexpected EOF in archive"), and it adds a "/" member and layers without
history. umoci and skopeo still check the result: tests/binary/test_image.py inspects it with skopeo,
unpacks it with umoci and serves from the unpacked root.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import marshal
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tomllib
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol, cast
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))
from manifest import sha256  # build/manifest.py: the build's one file-digest helper

ROOT = Path(__file__).resolve().parent.parent

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

USER_ID = 65532
PORT = 3000
BINARY_PATH = "usr/local/bin/appliance"
DOC_DIR = "usr/share/doc/appliance"
SBOM_PATH = f"{DOC_DIR}/sbom.spdx.json"
LIB_DIR = "usr/lib/x86_64-linux-gnu"
INTERPRETER = "/lib64/ld-linux-x86-64.so.2"
HOST_LIB_DIRS = (
    Path("/lib/x86_64-linux-gnu"),
    Path("/usr/lib/x86_64-linux-gnu"),
    Path("/lib64"),
    Path("/usr/lib64"),
    Path("/lib"),
    Path("/usr/lib"),
)
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
GZIP_LEVEL = 6  # zlib's default: ~7 s for the 200 MB binary on one core; 9 saves ~1% for several times that

# The driver side of CUDA, mounted by the NVIDIA container toolkit: must match the host's kernel module.
DRIVER_LIBS = re.compile(r"^lib(cuda|nvidia-[a-z-]+)\.so")
# The CUDA runtime libraries the image carries, by the pinned wheel (build/requirements-cuda.lock) they come from.
CUDA_WHEELS = {
    "libcudart": "nvidia-cuda-runtime",
    "libcublas": "nvidia-cublas",
    "libcublasLt": "nvidia-cublas",
    "libnvrtc": "nvidia-cuda-nvrtc",
    "libnvJitLink": "nvidia-nvjitlink",
}

# Import names of the pinned distributions whose name does not say them (the rest: name with _ for -).
IMPORT_NAMES = {
    "attrs": ("attr", "attrs"),
    "graphql-core": ("graphql",),
    "llama-cpp-python": ("llama_cpp",),
    "markdown-it-py": ("markdown_it",),
    "pyinstaller": ("pyimod01_archive", "PyInstaller"),  # its bootloader and loader modules are in every build
    "pyinstaller-hooks-contrib": ("_pyinstaller_hooks_contrib",),
    "pyyaml": ("yaml", "_yaml"),
    "rpds-py": ("rpds",),
}


class BuildError(Exception):
    """A reason not to write the image, said to the user as it is."""


# --- reading the frozen binary --------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveEntry:
    name: str
    offset: int  # absolute, in the binary
    length: int
    compressed: bool
    typecode: str


_COOKIE_MAGIC = b"MEI\014\013\012\013\016"
_COOKIE = struct.Struct("!8sIIII64s")
_TOC_ENTRY = struct.Struct("!IIIIBc")


def _rfind(f: IO[bytes], size: int, pattern: bytes, chunk: int = 1 << 20) -> int:
    end = size
    while end > 0:
        start = max(0, end - chunk)
        f.seek(start)
        pos = f.read(end - start + len(pattern) - 1).rfind(pattern)
        if pos >= 0:
            return start + pos
        end = start
    return -1


def archive_entries(binary: Path) -> list[ArchiveEntry]:
    """The table of contents of the PyInstaller archive inside a one-file binary (PyInstaller 6 layout)."""
    size = binary.stat().st_size
    with open(binary, "rb") as f:
        cookie_at = _rfind(f, size, _COOKIE_MAGIC)
        if cookie_at < 0:
            raise BuildError(f"{binary}: no PyInstaller archive in it (not a `make binary` executable?)")
        f.seek(cookie_at)
        _, length, toc_offset, toc_length, _, _ = _COOKIE.unpack(f.read(_COOKIE.size))
        start = cookie_at + _COOKIE.size - length
        f.seek(start + toc_offset)
        toc = f.read(toc_length)
    entries, pos = [], 0
    while pos < len(toc):
        entry_length, offset, data_length, _, cflag, typecode = _TOC_ENTRY.unpack_from(toc, pos)
        name = toc[pos + _TOC_ENTRY.size : pos + entry_length].rstrip(b"\0").decode()
        entries.append(ArchiveEntry(name, start + offset, data_length, bool(cflag), typecode.decode()))
        pos += entry_length
    return entries


def read_entry(binary: Path, e: ArchiveEntry, limit: int | None = None) -> bytes:
    with open(binary, "rb") as f:
        f.seek(e.offset)
        if not e.compressed:
            return f.read(e.length if limit is None else min(limit, e.length))
        data = f.read(e.length)
    return zlib.decompress(data) if limit is None else zlib.decompressobj().decompress(data, limit)


def frozen_modules(binary: Path, entries: list[ArchiveEntry]) -> set[str]:
    """Every module name in the archive's PYZ, plus the top-level scripts and modules beside it."""
    names = {e.name for e in entries if e.typecode in "msM"}
    for e in entries:
        if e.typecode != "z":
            continue
        pyz = read_entry(binary, e)
        if pyz[:4] != b"PYZ\0":
            raise BuildError(f"{binary}: {e.name} is not a PYZ archive")
        (toc_offset,) = struct.unpack_from("!i", pyz, 8)
        names.update(name for name, _ in marshal.loads(pyz[toc_offset:]))
    return names


@dataclass(frozen=True)
class Elf:
    interpreter: str | None
    needed: tuple[str, ...]


def parse_elf(data: bytes | mmap.mmap, what: str) -> Elf:
    """PT_INTERP and DT_NEEDED of an x86-64 ELF object."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError(f"{what}: not a 64-bit little-endian ELF object")
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    interpreter, dynamic, loads = None, None, []
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            interpreter = data[p_offset : p_offset + p_filesz].rstrip(b"\0").decode()
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (p_offset, p_filesz)
        elif p_type == 1:  # PT_LOAD
            loads.append((p_vaddr, p_offset, p_filesz))
    if dynamic is None:
        return Elf(interpreter, ())
    offsets, strtab_address = [], None
    for off in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, value = struct.unpack_from("<qQ", data, off)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            offsets.append(value)
        elif tag == 5:  # DT_STRTAB, an address: mapped to the file through the load segments
            strtab_address = value
    strtab = next(
        (
            strtab_address - va + fo
            for va, fo, sz in loads
            if strtab_address is not None and va <= strtab_address < va + sz
        ),
        None,
    )
    if offsets and strtab is None:
        raise BuildError(f"{what}: DT_NEEDED without a string table")
    names = []
    for n in offsets:
        start = (strtab or 0) + n
        names.append(bytes(data[start : data.find(b"\0", start)]).decode())
    return Elf(interpreter, tuple(names))


# --- the host's side ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    arch: str


def _dpkg_query(*args: str) -> str | None:
    try:
        out = subprocess.run(["dpkg-query", *args], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    except FileNotFoundError:
        return None
    return out.stdout if out.returncode == 0 else None


def deb_package(name: str) -> DebPackage | None:
    out = _dpkg_query("-W", "-f", "${Package}\t${Version}\t${Architecture}\n", name)
    if not out:
        return None
    pkg, version, arch = out.splitlines()[0].split("\t")
    return DebPackage(pkg, version, arch)


def deb_owner(path: Path) -> DebPackage | None:
    """The Debian package that installed `path` (`dpkg -S`; with merged /usr dpkg knows the /lib names)."""
    for p in dict.fromkeys((str(path), str(path.resolve()))):
        out = _dpkg_query("-S", p)
        for line in (out or "").splitlines():
            if line.startswith("diversion ") or ": " not in line:
                continue
            owner, owned = line.split(": ", 1)
            if owned.strip() == p:
                return deb_package(owner.split(",")[0].strip())
    return None




@dataclass(frozen=True)
class HostLibrary:
    soname: str
    path: Path  # where it was found (the name the loader would use)
    origin: DebPackage | str  # Debian package, or a description of where it came from


def host_libraries(
    needed: Iterable[str], dirs: list[Path], origin: Callable[[Path], DebPackage | str], leave: set[str]
) -> list[HostLibrary]:
    """`needed` and, recursively, what those need but `leave`, found in `dirs` (first match, as the loader would)."""
    found: dict[str, HostLibrary] = {}
    todo = sorted(set(needed), reverse=True)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = next((d / name for d in dirs if (d / name).is_file()), None)
        if path is None:
            raise BuildError(f"{name} is needed but not found in {', '.join(map(str, dirs))}")
        found[name] = HostLibrary(name, path, origin(path))
        todo.extend(sorted(set(parse_elf(path.read_bytes(), str(path)).needed) - set(found) - leave, reverse=True))
    return [found[n] for n in sorted(found)]


def _host_origin(path: Path) -> DebPackage | str:
    return deb_owner(path) or f"host file {path} (no Debian package owns it)"


# --- the image's files ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    kind: str  # "dir" | "file" | "link"
    mode: int = 0o755
    data: bytes | None = None
    source: Path | None = None  # file content from disk (the binary, libraries), streamed
    target: str = ""


class Tree:
    """The layer's contents by path (relative, no leading /); parent directories are added as 0755."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.nodes.setdefault("/".join(parts[:i]), Node("dir"))

    def dir(self, path: str, mode: int = 0o755) -> None:
        self._parents(path)
        self.nodes[path] = Node("dir", mode)

    def file(self, path: str, *, data: bytes | None = None, source: Path | None = None, mode: int = 0o644) -> None:
        self._parents(path)
        self.nodes[path] = Node("file", mode, data=data, source=source)

    def link(self, path: str, target: str) -> None:
        self._parents(path)
        self.nodes[path] = Node("link", 0o777, target=target)


class _Sink(Protocol):
    def write(self, b: bytes, /) -> int: ...

    def flush(self) -> None: ...


class _Counting:
    """A write-only stream that hashes and counts what passes through to `out`."""

    def __init__(self, out: _Sink) -> None:
        self.out, self.sha256, self.size = out, hashlib.sha256(), 0

    def write(self, b: bytes, /) -> int:
        self.sha256.update(b)
        self.size += len(b)
        self.out.write(b)
        return len(b)

    def flush(self) -> None:
        self.out.flush()


def _tarinfo(path: str, node: Node, epoch: int, size: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(path)
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname, ti.mode = epoch, 0, 0, "", "", node.mode
    if node.kind == "dir":
        ti.type = tarfile.DIRTYPE
    elif node.kind == "link":
        ti.type, ti.linkname = tarfile.SYMTYPE, node.target
    else:
        ti.type, ti.size = tarfile.REGTYPE, size
    return ti


def write_tar(out: _Sink, nodes: dict[str, Node], epoch: int) -> None:
    """A USTAR archive of `nodes` in path order: parents first, nothing from the build machine's clock or users."""
    with tarfile.open(fileobj=cast(IO[bytes], out), mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(nodes):
            node = nodes[path]
            if node.kind != "file":
                tar.addfile(_tarinfo(path, node, epoch))
            elif node.source is not None:
                with open(node.source, "rb") as f:
                    tar.addfile(_tarinfo(path, node, epoch, os.fstat(f.fileno()).st_size), f)
            else:
                data = node.data or b""
                tar.addfile(_tarinfo(path, node, epoch, len(data)), io.BytesIO(data))


@dataclass(frozen=True)
class Blob:
    media_type: str
    digest: str
    size: int

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def put_blob(blobs: Path, data: bytes, media_type: str) -> Blob:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return Blob(media_type, f"sha256:{digest}", len(data))


def put_layer(blobs: Path, nodes: dict[str, Node], epoch: int) -> tuple[Blob, str, int]:
    """The gzipped layer blob, its diff_id (digest of the tar) and the tar's size."""
    tmp = blobs / ".layer.partial"
    with open(tmp, "wb") as raw:
        compressed = _Counting(raw)
        # filename="" and mtime=0: the gzip header holds neither a name nor a time.
        with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, compresslevel=GZIP_LEVEL, mtime=0) as gz:
            plain = _Counting(gz)
            write_tar(plain, nodes, epoch)
    digest = compressed.sha256.hexdigest()
    tmp.rename(blobs / digest)
    return Blob(MT_LAYER, f"sha256:{digest}", compressed.size), f"sha256:{plain.sha256.hexdigest()}", plain.size


# --- SBOM -----------------------------------------------------------------------------------------------


def _spdx_id(kind: str, name: str) -> str:
    return "SPDXRef-" + re.sub(r"[^A-Za-z0-9.-]", "-", f"{kind}-{name}")


def _package(spdx_id: str, name: str, version: str, **extra: Any) -> dict[str, Any]:
    pkg = {
        "SPDXID": spdx_id,
        "name": name,
        "versionInfo": version,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": False,
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
    }
    pkg.update(extra)
    return pkg


def _purl(spdx_type: str, locator: str) -> dict[str, str]:
    return {"referenceCategory": "PACKAGE-MANAGER", "referenceType": spdx_type, "referenceLocator": locator}


def _distro() -> str:
    """purl's distro qualifier for Debian packages, e.g. `&distro=debian-12`."""
    try:
        release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    except OSError:
        return ""
    os_id, version = release.get("ID", "").strip('"'), release.get("VERSION_ID", "").strip('"')
    return f"&distro={os_id}-{version}" if os_id and version else ""


def _deb(pkg: DebPackage) -> dict[str, Any]:
    return _package(
        _spdx_id("Deb", pkg.name),
        pkg.name,
        pkg.version,
        supplier="Organization: Debian",
        primaryPackagePurpose="LIBRARY",
        externalRefs=[
            _purl(
                "purl",
                f"pkg:deb/debian/{quote(pkg.name, safe='')}@{quote(pkg.version, safe='')}?arch={pkg.arch}{_distro()}",
            )
        ],
    )


@dataclass(frozen=True)
class SbomInputs:
    variant: str
    manifest: dict[str, Any]
    binary_sha256: str
    revision: str
    source: str | None
    created: str
    licence: str
    modules: set[str]  # frozen module names and archive paths
    bundled_debs: list[DebPackage]  # host Debian libraries PyInstaller copied into the binary
    copied: list[HostLibrary]  # host libraries copied into the image
    other_debs: list[DebPackage]  # other Debian packages whose files the image holds (ca-certificates)
    build_lock: set[str]  # distributions pinned by build/requirements-build.lock: the freezer's, not the app's


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _frozen(dist: str, modules: set[str]) -> bool:
    """Whether a pinned distribution is in the binary: one of its import names (or its .dist-info) is."""
    names = IMPORT_NAMES.get(dist) or (dist.replace("-", "_"),)
    tops = {m.split(".")[0] for m in modules} | {m.split("/")[0] for m in modules}
    dist_infos = {
        _normalized(m.split("/")[0].removesuffix(".dist-info").rsplit("-", 1)[0])
        for m in modules
        if m.split("/")[0].endswith(".dist-info")
    }
    return any(n in tops or n in modules for n in names) or _normalized(dist) in dist_infos


def sbom(i: SbomInputs) -> dict[str, Any]:
    """SPDX 2.3: the image contains the binary and host files; the binary contains what its build put in it."""
    build = i.manifest["build"]
    version = build["appliance"]
    doc_name = f"appliance-{i.variant}-{version}"
    ns = uuid.uuid5(uuid.NAMESPACE_URL, f"appliance/{i.variant}/{i.binary_sha256}/{i.revision}")
    image_id, binary_id = "SPDXRef-Image", "SPDXRef-Binary"
    packages = [
        _package(
            image_id,
            f"appliance-{i.variant}",
            version,
            primaryPackagePurpose="CONTAINER",
            comment="OCI image written by build/image.py; its manifest digest is in the layout's index.json "
            "(a document inside the image cannot name the digest of the image).",
        ),
        _package(
            binary_id,
            "appliance",
            version,
            primaryPackagePurpose="APPLICATION",
            packageFileName=f"/{BINARY_PATH}",
            checksums=[{"algorithm": "SHA256", "checksumValue": i.binary_sha256}],
            licenseDeclared=i.licence,
            sourceInfo=f"built from {i.source or 'the appliance repository'} at commit {build['source_commit']}"
            + (" with uncommitted changes" if build.get("source_dirty") else ""),
            comment=f"PyInstaller {build['pyinstaller']} one-file executable; build manifest at "
            f"/{DOC_DIR}/{i.manifest['binary']['name']}.manifest.json",
        ),
    ]
    rel = [
        {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": image_id},
        {"spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": binary_id},
    ]

    def contains(parent: str, pkg: dict[str, Any]) -> None:
        packages.append(pkg)
        rel.append({"spdxElementId": parent, "relationshipType": "CONTAINS", "relatedSpdxElement": pkg["SPDXID"]})

    py = build["python"]
    contains(
        binary_id,
        _package(
            _spdx_id("Runtime", "cpython"),
            "cpython",
            py["version"],
            primaryPackagePurpose="FRAMEWORK",
            licenseDeclared="Python-2.0",
            externalRefs=[_purl("purl", f"pkg:generic/cpython@{py['version']}")],
            comment=f"{py['implementation']} {py['version']} ({py['compiler']}), the interpreter in the binary",
        ),
    )
    if i.manifest.get("model"):
        m = i.manifest["model"]
        contains(
            binary_id,
            _package(
                _spdx_id("Model", m["name"]),
                m["name"],
                "NOASSERTION",
                primaryPackagePurpose="FILE",
                packageFileName=f"embedded_model/{m['name']}.gguf",
                checksums=[{"algorithm": "SHA256", "checksumValue": m["sha256"]}],
                comment="GGUF model embedded in the binary and served by default",
            ),
        )
    llama = build["llama_cpp_python"]
    libs = llama["libraries"]
    for name in sorted(libs):
        m = re.fullmatch(r"(lib[A-Za-z0-9_-]+)\.so\.(\d+\.\d+\.\d+)", name)
        if not m:  # the .so and .so.N names are links to the fully versioned file
            continue
        contains(
            binary_id,
            _package(
                _spdx_id("Lib", name),
                m.group(1),
                m.group(2),
                primaryPackagePurpose="LIBRARY",
                packageFileName=f"llama_cpp/lib/{name}",
                checksums=[{"algorithm": "SHA256", "checksumValue": libs[name]}],
                licenseDeclared="MIT",
                comment=f"llama.cpp, as vendored by llama-cpp-python {llama['version']}, compiled with "
                f"{' '.join(llama['cmake_flags'])}; patches {', '.join(sorted(llama['patches'])) or 'none'}",
            ),
        )
    for name in sorted(n for n in libs if n.startswith("libggml-cpu-")):
        contains(
            binary_id,
            _package(
                _spdx_id("Lib", name),
                name.removesuffix(".so"),
                llama["version"],
                primaryPackagePurpose="LIBRARY",
                packageFileName=f"llama_cpp/lib/{name}",
                checksums=[{"algorithm": "SHA256", "checksumValue": libs[name]}],
                licenseDeclared="MIT",
                comment="ggml CPU backend module (runtime dispatch), from llama-cpp-python's vendored llama.cpp",
            ),
        )
    for dist, ver in sorted(build["packages"].items()):
        pkg = _package(
            _spdx_id("PyPI", dist),
            dist,
            ver,
            primaryPackagePurpose="LIBRARY",
            externalRefs=[_purl("purl", f"pkg:pypi/{dist}@{ver}")],
        )
        packages.append(pkg)
        if dist in i.build_lock:
            kind, note = "BUILD_TOOL_OF", "the freezer (build/requirements-build.lock)"
        elif _frozen(dist, i.modules):
            kind, note = "CONTAINS", "frozen into the binary (found among its modules)"
        else:
            kind, note = (
                "DEV_DEPENDENCY_OF",
                "in the build environment (requirements.lock), not among the frozen modules",
            )
        pkg["comment"] = f"pinned wheel; {note}"
        if kind == "CONTAINS":
            rel.append({"spdxElementId": binary_id, "relationshipType": kind, "relatedSpdxElement": pkg["SPDXID"]})
        else:
            rel.append({"spdxElementId": pkg["SPDXID"], "relationshipType": kind, "relatedSpdxElement": binary_id})
        if dist == "pyinstaller":  # and its bootloader is the binary's first part
            rel.append(
                {"spdxElementId": binary_id, "relationshipType": "CONTAINS", "relatedSpdxElement": pkg["SPDXID"]}
            )

    seen: dict[str, str] = {}
    for deb in i.bundled_debs:
        contains(binary_id, _deb(deb))
        seen[deb.name] = binary_id
    image_debs: dict[str, tuple[DebPackage, list[str]]] = {}
    for lib in i.copied:
        if isinstance(lib.origin, DebPackage):
            image_debs.setdefault(lib.origin.name, (lib.origin, []))[1].append(lib.soname)
        else:
            # The CUDA runtime: a file of a pinned NVIDIA wheel ("pypi:name==version"), or of unknown origin.
            wheel = re.fullmatch(r"pypi:([A-Za-z0-9._-]+)==(\S+)", lib.origin)
            extra: dict[str, Any] = {"comment": lib.origin}
            if wheel:
                extra["externalRefs"] = [_purl("purl", f"pkg:pypi/{wheel.group(1)}@{wheel.group(2)}")]
                extra["comment"] = (
                    f"from the pinned wheel {wheel.group(1)}=={wheel.group(2)} (build/requirements-cuda.lock)"
                )
            contains(
                image_id,
                _package(
                    _spdx_id("File", lib.soname),
                    lib.soname,
                    wheel.group(2) if wheel else "NOASSERTION",
                    primaryPackagePurpose="LIBRARY",
                    packageFileName=f"/{LIB_DIR}/{lib.soname}",
                    checksums=[{"algorithm": "SHA256", "checksumValue": sha256(lib.path)}],
                    **extra,
                ),
            )
    for deb in i.other_debs:
        image_debs.setdefault(deb.name, (deb, []))
    for name in sorted(image_debs):
        deb, files = image_debs[name]
        if name in seen:  # one SPDX package per Debian package: the same one in the binary and in the image
            rel.append(
                {"spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": _spdx_id("Deb", name)}
            )
        else:
            pkg = _deb(deb)
            if files:
                pkg["comment"] = f"copied from the build host: {', '.join(files)}"
            contains(image_id, pkg)
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": doc_name,
        "documentNamespace": f"https://spdx.org/spdxdocs/{doc_name}-{ns}",
        "creationInfo": {
            "created": i.created,
            "creators": [f"Tool: appliance-build-image-{version}"],
            "comment": "From the binary's build manifest, its PyInstaller archive and the build host's dpkg database.",
        },
        "packages": packages,
        "relationships": rel,
    }


# --- putting it together --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    variant: str
    binary: Path
    layout: Path
    archive: Path
    sbom: Path
    revision: str
    source: str | None
    epoch: int
    tag: str
    cuda_runtime: Path | None
    ca_bundle: Path


def _cuda_lock_versions() -> dict[str, str]:
    text = (ROOT / "build" / "requirements-cuda.lock").read_text()
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r"^([A-Za-z0-9._-]+)==([^\s\\;]+)", text, re.M)}


def default_cuda_runtime() -> Path:
    """Where scripts/cuda-toolkit.sh puts the pinned toolkit's libraries."""
    cache = Path(
        os.environ.get("APPLIANCE_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "appliance"
    )
    key = sha256(ROOT / "build" / "requirements-cuda.lock")[:12]
    return cache / "cuda-toolkit" / key / "nvidia" / "cu13" / "lib"


def _passwd() -> tuple[bytes, bytes]:
    passwd = (
        f"root:x:0:0:root:/root:/sbin/nologin\nappliance:x:{USER_ID}:{USER_ID}:appliance:/nonexistent:/sbin/nologin\n"
    )
    group = f"root:x:0:\nappliance:x:{USER_ID}:\n"
    return passwd.encode(), group.encode()


def _load_checked_manifest(binary: Path) -> tuple[dict[str, Any], str]:
    manifest_path = binary.with_name(binary.name + ".manifest.json")
    sidecar = binary.with_name(binary.name + ".sha256")
    for p in (manifest_path, sidecar):
        if not p.is_file():
            raise BuildError(f"{p} missing: `make binary` writes it next to the binary")
    manifest = json.loads(manifest_path.read_text())
    digest = sha256(binary)
    if sidecar.read_text().split() != [digest, binary.name] or manifest["binary"]["sha256"] != digest:
        raise BuildError(
            f"{binary}: its digest {digest} is not the one in {sidecar.name} and {manifest_path.name} (stale?)"
        )
    return manifest, digest


def build(o: Options, log: Callable[[str], None]) -> dict[str, Any]:
    if not o.binary.is_file():
        make = "make binary-cuda (needs nvcc: README, CUDA)" if o.variant == "cuda" else "make binary"
        raise BuildError(f"no {o.variant} binary at {o.binary}: build it first ({make})")
    manifest, binary_sha256 = _load_checked_manifest(o.binary)
    build_info = manifest["build"]
    if build_info.get("variant") != o.variant:
        raise BuildError(f"{o.binary} is a {build_info.get('variant')} build, not {o.variant}")
    if build_info.get("platform") != "linux-x86_64":
        raise BuildError(f"{o.binary}: only linux-x86_64 images are made here, not {build_info.get('platform')}")
    if o.revision != build_info.get("source_commit") or build_info.get("source_dirty"):
        dirty = " with uncommitted changes" if build_info.get("source_dirty") else ""
        log(
            f"note: the binary was built from {build_info.get('source_commit')}{dirty}; "
            f"the image is labelled {o.revision}"
        )
    version = build_info["appliance"]

    # What the binary needs from the system: the bootloader's own needs (it runs before anything is unpacked),
    # and whatever the archive's libraries need that the archive does not carry.
    entries = archive_entries(o.binary)
    with open(o.binary, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as whole:
        boot = parse_elf(whole, str(o.binary))
    if boot.interpreter != INTERPRETER:
        raise BuildError(f"{o.binary}: ELF interpreter {boot.interpreter}, expected {INTERPRETER}")
    bundled_names = {e.name.rsplit("/", 1)[-1] for e in entries}
    needed = set(boot.needed) | {INTERPRETER.rsplit("/", 1)[-1]}
    bundled_debs: dict[str, DebPackage] = {}
    for e in entries:
        if e.typecode not in "bx" or read_entry(o.binary, e, 4) != b"\x7fELF":
            continue
        data = read_entry(o.binary, e)
        needed |= set(parse_elf(data, f"{o.binary.name}:{e.name}").needed) - bundled_names
        # A system library PyInstaller copied in as it was: the Debian package it came from goes in the SBOM.
        host = HOST_LIB_DIRS[0] / e.name
        if "/" not in e.name and host.is_file() and sha256(host) == hashlib.sha256(data).hexdigest():
            deb = deb_owner(host)
            if deb:
                bundled_debs[deb.name] = deb

    dirs = list(HOST_LIB_DIRS)
    cuda_versions: dict[str, str] = {}
    driver = sorted(n for n in needed if DRIVER_LIBS.match(n))
    if o.variant == "cuda":
        if o.cuda_runtime is None or not o.cuda_runtime.is_dir():
            raise BuildError(
                f"no CUDA runtime libraries at {o.cuda_runtime}: scripts/cuda-toolkit.sh assembles the pinned ones "
                "(or --cuda-runtime DIR)"
            )
        dirs.insert(0, o.cuda_runtime)
        cuda_versions = _cuda_lock_versions()
    elif driver:
        raise BuildError(f"{o.binary} is a cpu build yet needs {', '.join(driver)}")
    needed -= set(driver)

    def origin(path: Path) -> DebPackage | str:
        if o.cuda_runtime is not None and path.parent == o.cuda_runtime:
            wheel = CUDA_WHEELS.get(path.name.split(".so")[0])
            if wheel and wheel in cuda_versions:
                return f"pypi:{wheel}=={cuda_versions[wheel]}"
            return f"CUDA runtime library from {o.cuda_runtime}"
        return _host_origin(path)

    copied = host_libraries(needed, dirs, origin, leave=set(driver))

    tree = Tree()
    for d in ("dev", "proc", "sys"):
        tree.dir(d)
    tree.dir("tmp", 0o1777)
    tree.file(BINARY_PATH, source=o.binary, mode=0o755)
    for lib in copied:
        tree.file(f"{LIB_DIR}/{lib.soname}", source=lib.path.resolve(), mode=0o755)
    # Merged /usr, as on Debian: /lib64/ld-linux-x86-64.so.2 (the binary's interpreter) resolves into LIB_DIR.
    tree.link("lib", "usr/lib")
    tree.link("lib64", "usr/lib64")
    interp = INTERPRETER.rsplit("/", 1)[-1]
    tree.link(f"usr/lib64/{interp}", f"../lib/x86_64-linux-gnu/{interp}")
    passwd, group = _passwd()
    tree.file("etc/passwd", data=passwd)
    tree.file("etc/group", data=group)
    tree.file("etc/nsswitch.conf", data=b"passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n")
    if not o.ca_bundle.is_file():
        raise BuildError(f"no CA bundle at {o.ca_bundle} (apt-get install ca-certificates)")
    tree.file("etc/ssl/certs/ca-certificates.crt", source=o.ca_bundle)
    other_debs = [d for d in [deb_package("ca-certificates")] if d is not None]
    image_debs = {lib.origin.name: lib.origin for lib in copied if isinstance(lib.origin, DebPackage)}
    for deb in sorted({*image_debs.values(), *other_debs}, key=lambda d: d.name):
        copyright_file = Path("/usr/share/doc") / deb.name / "copyright"
        if copyright_file.is_file():
            tree.file(f"usr/share/doc/{deb.name}/copyright", source=copyright_file.resolve())
    tree.file(f"{DOC_DIR}/{o.binary.name}.manifest.json", source=o.binary.with_name(o.binary.name + ".manifest.json"))

    created = datetime.fromtimestamp(o.epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    licence = str(pyproject["project"].get("license", "NOASSERTION"))
    build_lock = {
        m.group(1).lower()
        for m in re.finditer(r"^([A-Za-z0-9._-]+)==", (ROOT / "build" / "requirements-build.lock").read_text(), re.M)
    }
    doc = sbom(
        SbomInputs(
            variant=o.variant,
            manifest=manifest,
            binary_sha256=binary_sha256,
            revision=o.revision,
            source=o.source,
            created=created,
            licence=licence,
            modules=frozen_modules(o.binary, entries) | {e.name for e in entries},
            bundled_debs=sorted(bundled_debs.values(), key=lambda d: d.name),
            copied=copied,
            other_debs=other_debs,
            build_lock=build_lock,
        )
    )
    sbom_bytes = (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    tree.file(SBOM_PATH, data=sbom_bytes)

    labels = {
        "org.opencontainers.image.title": f"appliance ({o.variant})",
        "org.opencontainers.image.description": str(pyproject["project"].get("description", "appliance"))
        + f"; {o.variant} build, one frozen executable",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": o.revision,
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.licenses": licence,
        "dev.appliance.binary.sha256": binary_sha256,
        "dev.appliance.variant": o.variant,
    }
    if o.source:
        labels["org.opencontainers.image.source"] = o.source
    env = ["PATH=/usr/local/bin", "TMPDIR=/tmp", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"]
    if o.variant == "cuda":
        runtime = cuda_versions.get("nvidia-cuda-runtime", "")
        major_minor = ".".join(runtime.split(".")[:2])
        env += ["NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_DRIVER_CAPABILITIES=compute,utility"]
        if major_minor:
            env.append(f"NVIDIA_REQUIRE_CUDA=cuda>={major_minor}")
        if driver:
            labels["dev.appliance.cuda.driver-libraries"] = ",".join(driver)

    staging = o.layout.with_name(f".{o.layout.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    blobs = staging / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    log(f"layer: {len(tree.nodes)} entries, gzip level {GZIP_LEVEL}")
    layer, diff_id, tar_size = put_layer(blobs, tree.nodes, o.epoch)
    config = {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": f"{USER_ID}:{USER_ID}",
            "ExposedPorts": {f"{PORT}/tcp": {}},
            "Env": env,
            "Entrypoint": [f"/{BINARY_PATH}"],
            "Cmd": ["-p", str(PORT), "--host", "0.0.0.0"],
            "WorkingDir": "/",
            "Labels": labels,
            "StopSignal": "SIGTERM",
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": f"build/image.py --variant {o.variant}"}],
    }
    config_blob = put_blob(blobs, _canonical(config), MT_CONFIG)
    annotations = {k: v for k, v in labels.items() if k.startswith("org.opencontainers.image.")}
    image_manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": config_blob.descriptor(),
        "layers": [layer.descriptor()],
        "annotations": annotations,
    }
    manifest_blob = put_blob(blobs, _canonical(image_manifest), MT_MANIFEST)
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [
            {
                **manifest_blob.descriptor(),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": o.tag},
            }
        ],
    }
    (staging / "index.json").write_bytes(_canonical(index))
    (staging / "oci-layout").write_bytes(_canonical({"imageLayoutVersion": "1.0.0"}))

    _replace_layout(staging, o.layout)
    o.archive.parent.mkdir(parents=True, exist_ok=True)
    partial = o.archive.with_name(o.archive.name + ".partial")
    with open(partial, "wb") as out:
        write_tar(out, _layout_nodes(o.layout), o.epoch)
    partial.replace(o.archive)
    o.sbom.parent.mkdir(parents=True, exist_ok=True)
    o.sbom.write_bytes(sbom_bytes)
    return {
        "digest": manifest_blob.digest,
        "tag": o.tag,
        "layout": str(o.layout),
        "archive": str(o.archive),
        "sbom": str(o.sbom),
        "compressed_size": layer.size,
        "uncompressed_size": tar_size,
        "archive_size": o.archive.stat().st_size,
        "libraries": [lib.soname for lib in copied],
        "driver_libraries": driver,
    }


def _replace_layout(staging: Path, layout: Path) -> None:
    if layout.exists():
        if not (layout / "oci-layout").is_file() and any(layout.iterdir()):
            raise BuildError(f"{layout} exists and is not an OCI layout: not replacing it")
        shutil.rmtree(layout)
    layout.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(layout)


def _layout_nodes(layout: Path) -> dict[str, Node]:
    nodes: dict[str, Node] = {}
    for p in sorted(layout.rglob("*")):
        rel = p.relative_to(layout).as_posix()
        nodes[rel] = Node("dir") if p.is_dir() else Node("file", 0o644, source=p)
    return nodes


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    except FileNotFoundError:
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def parse_args(argv: list[str] | None) -> Options:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--binary", type=Path, help="frozen binary (default dist/appliance, dist/appliance-cuda)")
    ap.add_argument("--layout", type=Path, help="OCI layout directory (default dist/image/appliance-VARIANT)")
    ap.add_argument("--archive", type=Path, help="the layout as one tar (default dist/appliance-VARIANT.oci.tar)")
    ap.add_argument("--sbom", type=Path, help="SPDX JSON next to it (default dist/appliance-VARIANT.sbom.spdx.json)")
    ap.add_argument("--revision", help="org.opencontainers.image.revision (default: the binary's source commit)")
    ap.add_argument("--source", help="org.opencontainers.image.source URL (default: git remote origin, if any)")
    ap.add_argument("--source-date-epoch", type=int, help="default $SOURCE_DATE_EPOCH, else the build manifest's")
    ap.add_argument("--tag", help="the layout's ref name (default VERSION-VARIANT)")
    ap.add_argument("--cuda-runtime", type=Path, help="cuda: the CUDA runtime libraries (default: the pinned toolkit)")
    ap.add_argument("--ca-bundle", type=Path, default=CA_BUNDLE)
    a = ap.parse_args(argv)
    dist = ROOT / "dist"
    name = "appliance" if a.variant == "cpu" else "appliance-cuda"
    binary = (a.binary or dist / name).absolute()
    manifest_path = binary.with_name(binary.name + ".manifest.json")
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"build": {}}
    epoch = a.source_date_epoch
    if epoch is None:
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or manifest["build"].get("source_date_epoch") or 0)
    return Options(
        variant=a.variant,
        binary=binary,
        layout=(a.layout or dist / "image" / f"appliance-{a.variant}").absolute(),
        archive=(a.archive or dist / f"appliance-{a.variant}.oci.tar").absolute(),
        sbom=(a.sbom or dist / f"appliance-{a.variant}.sbom.spdx.json").absolute(),
        revision=a.revision or manifest["build"].get("source_commit") or "unknown",
        source=a.source or _git("config", "--get", "remote.origin.url"),
        epoch=epoch,
        tag=a.tag or f"{manifest['build'].get('appliance', '0')}-{a.variant}",
        cuda_runtime=(a.cuda_runtime or default_cuda_runtime()) if a.variant == "cuda" else None,
        ca_bundle=a.ca_bundle,
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    def log(msg: str) -> None:
        print(f"image: {msg}", file=sys.stderr)

    try:
        o = parse_args(argv)
        r = build(o, log)
    except BuildError as e:
        log(str(e))
        return 2
    print(f"{r['digest']}  {o.layout}:{r['tag']}")
    print(
        f"size: {_mb(r['compressed_size'])} compressed, {_mb(r['uncompressed_size'])} uncompressed (1 layer); "
        f"{o.archive} {_mb(r['archive_size'])}"
    )
    print(f"sbom: {o.sbom}")
    print(f"host libraries: {', '.join(r['libraries'])}")
    if r["driver_libraries"]:
        print(f"left to the NVIDIA container toolkit: {', '.join(r['driver_libraries'])}")
    if o.source is None:
        log("no org.opencontainers.image.source label: pass --source URL (no git remote here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
