"""Rebuild src/memformers/data/austen.json.gz: Jane Austen's six novels, the noise text shipped with memformers.

The novels are public domain. Debian packages them for R as `r-cran-janeaustenr`; that package keeps them in
`janeaustenr/data/Rdata.rdb` (a sequence of chunks: a 4-byte big-endian length, then a zlib stream holding one
object in R's XDR serialization) indexed by `Rdata.rdx` (a gzipped serialized list: object name -> [offset,
length] in the .rdb). Each novel is a character vector, one element per line of the Project Gutenberg text.
This script reads that format itself, so R is not needed:

    apt-get update && apt-get download r-cran-janeaustenr   # done for you when --deb is not given
    python scripts/build_austen.py [--deb FILE.deb] [--out src/memformers/data/austen.json.gz]

The output is gzipped JSON: {"source": ..., "books": {name: text}}, the text being the novel's lines joined by
newlines, exactly as packaged.
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
PACKAGE = "r-cran-janeaustenr"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "memformers" / "data" / "austen.json.gz"

# R's SEXP type codes (those the package's objects use) and the special pseudo-types of the stream.
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP = 255, 254, 253, 242, 241
NA_LENGTH = -1


class RReader:
    """A reader of R's XDR serialization (format versions 2 and 3), for vectors, pairlists and symbols."""

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError(f"not an XDR R serialization (magic {data[:2]!r}, expected b'X\\n')")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # the writer's R version, the oldest R that can read it
        if version == 3:
            n = self.int()
            self.pos += n  # native encoding name
        elif version != 2:
            raise ValueError(f"R serialization version {version} is not supported (2 or 3)")

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            upper, lower = self.int(), self.int()
            n = (upper << 32) + lower
        return n

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP, NILSXP):
            return None
        if kind == REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == CHARSXP:
            n = self.int()
            if n == NA_LENGTH:
                return None
            text = self.data[self.pos : self.pos + n].decode("utf-8", errors="replace")
            self.pos += n
            return text
        if kind == LISTSXP:  # pairlist: (attributes) (tag) car cdr
            attrs = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            head = (tag, self.item())
            rest = self.item()
            del attrs
            return [head] + (rest or [])
        if kind in (LGLSXP, INTSXP):
            n = self.length()
            values = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == REALSXP:
            n = self.length()
            values = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (STRSXP, VECSXP):
            values = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"R object type {kind} at byte {self.pos - 4} is not supported by this reader")
        if has_attr:
            attrs = dict(self.item() or [])
            names = attrs.get("names")
            if names is not None and kind == VECSXP:
                return dict(zip(names, values, strict=True))
        return values


def read_objects(rdb: Path, rdx: Path) -> dict[str, object]:
    """All objects of an R lazy-load database (.rdb data, .rdx index), by name."""
    index = RReader(gzip.decompress(rdx.read_bytes())).item()
    blob = rdb.read_bytes()
    objects = {}
    for name, (offset, size) in index["variables"].items():
        chunk = blob[offset : offset + size]
        (expected,) = struct.unpack(">I", chunk[:4])
        raw = zlib.decompress(chunk[4:])
        if len(raw) != expected:
            raise ValueError(f"{name}: {len(raw)} bytes decompressed, the chunk header says {expected}")
        objects[name] = RReader(raw).item()
    return objects


def fetch_deb(workdir: Path) -> Path:
    """Download the Debian package with apt (needs an apt source that carries it)."""
    subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, check=True)
    (deb,) = workdir.glob(f"{PACKAGE}_*.deb")
    return deb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deb", type=Path, help=f"a downloaded {PACKAGE} .deb (default: apt-get download it)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        deb = args.deb.resolve() if args.deb else fetch_deb(work)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
        (data_dir,) = (work / "root").glob("usr/lib/R/site-library/janeaustenr/data")
        objects = read_objects(data_dir / "Rdata.rdb", data_dir / "Rdata.rdx")
    missing = [name for name in BOOKS if name not in objects]
    if missing:
        raise SystemExit(f"the package lacks {missing}; it holds {sorted(objects)}")
    books = {name: "\n".join(line or "" for line in objects[name]) for name in BOOKS}
    payload = {"source": f"Debian {deb.name} (Project Gutenberg texts, public domain)", "books": books}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # no file name and no time in the gzip header: the same package always gives the same bytes
    with args.out.open("wb") as raw, gzip.GzipFile("", "wb", compresslevel=9, fileobj=raw, mtime=0) as f:
        f.write(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode("utf-8"))
    for name, text in books.items():
        print(f"{name:18s} {len(text.splitlines()):6d} lines {len(text.split()):7d} words")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
