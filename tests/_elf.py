"""Minimal ELF shared objects and wheels for the native-library tests, written byte by byte.

`shared_object` makes a 64-bit little-endian x86-64 ``ET_DYN`` with one ``PT_LOAD``, a ``PT_DYNAMIC`` and
the DT_NEEDED / DT_RPATH / DT_RUNPATH entries asked for: what a loader (and ``readelf -d``) reads to
decide which libraries to open. It has no code: it is never loaded, only inspected. `wheel` zips files
into a wheel pip installs (METADATA, WHEEL, RECORD with hashes).
"""

from __future__ import annotations

import base64
import hashlib
import struct
import zipfile
from pathlib import Path

_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_STRSZ, _DT_RPATH, _DT_RUNPATH = 0, 1, 5, 10, 15, 29


def shared_object(needed: list[str], *, rpath: str | None = None, runpath: str | None = None) -> bytes:
    """The bytes of an ELF shared object whose dynamic section names ``needed`` (and an RPATH/RUNPATH)."""
    strings = b"\0"
    offsets: dict[str, int] = {}
    for name in [*needed, *(p for p in (rpath, runpath) if p is not None)]:
        offsets.setdefault(name, len(strings))
        if offsets[name] == len(strings):
            strings += name.encode() + b"\0"
    ehsize, phentsize, phnum = 64, 56, 2
    strtab_off = ehsize + phentsize * phnum
    dyn_off = (strtab_off + len(strings) + 7) // 8 * 8
    entries = [(_DT_NEEDED, offsets[n]) for n in needed]
    if rpath is not None:
        entries.append((_DT_RPATH, offsets[rpath]))
    if runpath is not None:
        entries.append((_DT_RUNPATH, offsets[runpath]))
    entries += [(_DT_STRTAB, strtab_off), (_DT_STRSZ, len(strings)), (_DT_NULL, 0)]
    dynamic = b"".join(struct.pack("<qQ", tag, value) for tag, value in entries)
    total = dyn_off + len(dynamic)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 3, 62, 1, 0, ehsize, 0, 0, ehsize, phentsize, phnum, 64, 0, 0
    )
    load = struct.pack("<IIQQQQQQ", 1, 4, 0, 0, 0, total, total, 0x1000)
    dyn = struct.pack("<IIQQQQQQ", 2, 6, dyn_off, dyn_off, dyn_off, len(dynamic), len(dynamic), 8)
    body = header + load + dyn + strings
    return body + bytes(dyn_off - len(body)) + dynamic


def wheel(directory: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """Write ``<name>-<version>-cp311-cp311-manylinux_2_17_x86_64.whl`` holding ``files``; return its path."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        **files,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: rumi-tests\nRoot-Is-Purelib: false\n"
            b"Tag: cp311-cp311-manylinux_2_17_x86_64\n"
        ),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    out = directory / f"{name}-{version}-cp311-cp311-manylinux_2_17_x86_64.whl"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            info = zipfile.ZipInfo(path, date_time=(2024, 1, 1, 0, 0, 0))
            info.external_attr = (0o755 if path.endswith(".so") or ".so." in path else 0o644) << 16
            zf.writestr(info, data)
        zf.writestr(
            zipfile.ZipInfo(f"{dist_info}/RECORD", date_time=(2024, 1, 1, 0, 0, 0)), "\n".join(record) + "\n"
        )
    return out
