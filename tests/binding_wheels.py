"""The real TensorRT / cuda-python binding wheels for test_trt_api_names.py: fetched once into the user's cache,
and the names a TensorRT wheel's pybind11 module defines, read from its strings."""
from __future__ import annotations

import ast
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


class Unreachable(Exception):
    """pip could not download a wheel (no index or network, or no such version for this interpreter)."""


def wheels(package: str, version: str, deps: bool = False) -> list[Path]:
    """package==version's wheel(s) for this interpreter, downloaded once into the cache (into a temporary
    folder, then renamed: an interrupted download is never reused)."""
    final = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdrt" / "test-bindings" \
        / f"{package}-{version}-cp{sys.version_info[0]}{sys.version_info[1]}"  # the wheel is this Python's
    if not final.is_dir():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent)
        try:
            cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--disable-pip-version-check",
                   "-q", "-d", tmp, f"{package}=={version}"] + ([] if deps else ["--no-deps"])
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            except subprocess.TimeoutExpired:
                raise Unreachable(f"pip download {package}=={version} timed out") from None
            if r.returncode != 0:
                raise Unreachable(f"pip could not download {package}=={version}: {(r.stderr or r.stdout)[-300:]}")
            try:
                os.rename(tmp, final)
            except OSError:  # another run renamed its copy first: use that one
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    found = sorted(final.glob("*.whl"))
    assert found, f"{final} holds no wheel: delete it to download again"
    return found


def rodata(elf: bytes) -> bytes:
    """A 64-bit little-endian ELF file's .rodata: its string literals, so the names pybind11 registers; the
    symbol tables (C++ mangled names, Python's C API) are left out."""
    assert elf[:6] == b"\x7fELF\x02\x01", "not a 64-bit little-endian ELF file"
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names = sections[shstrndx][4]
    for name, _type, _flags, _addr, offset, size in sections:
        if elf[names + name: elf.index(b"\0", names + name)] == b".rodata":
            return elf[offset: offset + size]
    raise AssertionError("no .rodata section")


class Names:
    """The names a binding defines: each NUL-terminated string that is a whole identifier, and its tails.
    Whole strings, not identifier runs: "FP16" is still in TensorRT 11's docstrings ("FP16 format") but no
    longer registered. Tails: the linker stores a string ending another one once ("INPUT" is the tail of
    "CONDITIONAL_INPUT"), so a tail may be a name (`exact` tells which are whole strings)."""

    def __init__(self, label: str, whole: set[str]):
        self.label, self.exact = label, set(whole)
        self._tails = {s[i:] for s in whole for i in range(len(s))}

    def __contains__(self, name: str) -> bool:
        return name in self._tails


def tensorrt_names(wheel: Path, label: str) -> Names:
    """What `import tensorrt` defines, from a tensorrt-cu*-bindings wheel: the pybind11 module's names plus
    those its package __init__.py assigns at top level (`__version__`)."""
    with zipfile.ZipFile(wheel) as z:
        sos = [n for n in z.namelist() if re.fullmatch(r"tensorrt[^/]*/tensorrt[^/]*\.so", n)]
        assert len(sos) == 1, f"{wheel.name}: expected one tensorrt*/tensorrt*.so, found {sos}"
        ident = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")
        whole = {s.decode() for s in rodata(z.read(sos[0])).split(b"\0") if ident.fullmatch(s)}
        init = ast.parse(z.read(sos[0].rsplit("/", 1)[0] + "/__init__.py"))
    for stmt in init.body:
        whole |= {n.id for t in getattr(stmt, "targets", []) for n in ast.walk(t) if isinstance(n, ast.Name)}
    return Names(label, whole)
