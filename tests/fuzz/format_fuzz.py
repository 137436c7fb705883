#!/usr/bin/env python3
"""Format fuzzer through the server, with a differential oracle.

Each run starts from a seed: the valid input of each format, and every mutation of it, come
from random.Random(seed), so `--seed S --only N` replays case N exactly.  Cases are written
into a directory served by `file dir=` under the format's filter (a fresh server every
--batch cases), and a libnbd client does what a real one does: the handshake, reads of the
whole disk, and a write (read back, then checked in the file by an independent decoder) or,
on read-only exports, a write that must be refused.

The oracle is a reference decoder that is not ours: Python's gzip rules (zlib, members,
zero padding and trailing garbage as gzip(1)), lzma, zstandard, tarfile, zipfile, for
LUKS the specification's own layout decrypted with the volume key the seed was made with
(tests/fixtures/luks_spec.py), and qemu-img for qcow2.  When the reference accepts the input, every byte served must
equal its output (the server may still refuse, more strictly: counted as "stricter", or as
"justified: <reason>" when justified() names why: the reference skips a check the format
requires, which an independent tool makes (the seekable format's checksums, cryptsetup's
reading of a LUKS header, bsdtar's and unzip's of a zip's directory), or the input uses
something refused by name, as unsupported).  When
it refuses, the server may serve what it can, but a format that carries its own checksums
(gzip, xz, zstd's seek table, zip's CRC-32) must not serve all of the data as good.  A
Python traceback or an unexpected exception in the server's log, a server that dies, wrong
bytes, a write that lands wrong or is not refused, or a case slower than --case-timeout is a
finding: its case is kept in --keep-dir as a small file to replay.  XVA (one archive per
server) runs in-process instead, through the filter chain.

    .venv/bin/python tests/fuzz/format_fuzz.py --format tar --cases 100000 --seed 7
"""

from __future__ import annotations

import argparse
import base64
import bz2
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nbd
import xxhash
import zstandard

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fixtures.luks import reference_crypt  # noqa: E402
from fixtures.luks_spec import luks1_image, luks2_image  # noqa: E402

FORMATS = ["gzip", "xz", "zstd", "tar", "zip", "luks1", "luks2", "xva", "qcow2", "vmdk", "vhd", "vhdx", "vdi", "bzip2",
           "lzip"]
# Disk images made by qemu-img (1 MiB disks) and read back by it as the reference (qcow2 too: its seed
# is made in make_seed).
QEMU_FORMATS = {"qcow2": "qcow2", "vmdk": "vmdk", "vhd": "vpc", "vhdx": "vhdx", "vdi": "vdi"}
QEMU_IMAGES = {"vmdk": ("vmdk", ["subformat=streamOptimized"]), "vhd": ("vpc", ["subformat=dynamic"]),
               "vhdx": ("vhdx", ["subformat=dynamic", "block_size=1M"]), "vdi": ("vdi", [])}
QEMU_MAX_SIZE = 16 << 20  # a mutated header may claim a huge disk: qemu's decode is not compared beyond this
PASSPHRASE = b"fuzz passphrase"
DISK_SIZE = 64 << 10
READ = 16 << 10  # bytes per read request
SAMPLED = 1 << 20  # larger disks are read at their start, middle and end only
ENV = dict(os.environ, PATH="/usr/bin:/usr/sbin:/bin:/sbin:" + os.environ.get("PATH", ""))


def disk_image(rng: random.Random) -> bytes:
    """64 KiB like a disk: text, noise and zeroes (every kind of compressed block appears)."""
    text = b"".join(b"sector %d: the quick brown fox\n" % n for n in range(700))[:DISK_SIZE // 4]
    return (text + rng.randbytes(DISK_SIZE // 4) + bytes(DISK_SIZE // 4) + text)[:DISK_SIZE]


# -- Valid seeds -----------------------------------------------------------------------------------
@dataclass
class Seed:
    data: bytes  # the valid input
    disk: bytes  # what it holds
    args: list[str]  # the filter and its parameters on the command line
    master_key: bytes = b""  # LUKS: the volume key, for the reference


def make_seed(fmt: str, rng: random.Random, work: Path) -> Seed:
    disk = disk_image(rng)
    if fmt == "gzip":  # two members, as `cat a.gz b.gz`
        half = DISK_SIZE // 2
        return Seed(gzip.compress(disk[:half], 9, mtime=0) + gzip.compress(disk[half:], 1, mtime=0), disk,
                    ["--filter=gzip"])
    if fmt == "xz":
        raw = work / "disk.img"
        raw.write_bytes(disk)
        blob = subprocess.run(["xz", "-c", "--block-size=16KiB", "--check=crc64", raw], check=True,
                              capture_output=True, timeout=60, env=ENV).stdout
        return Seed(blob, disk, ["--filter=xz"])
    if fmt == "zstd":
        from fixtures.compressed import seekable_zstd
        return Seed(seekable_zstd(disk, work / "seed.zst", frame_size=16 << 10).read_bytes(), disk, ["--filter=zstd"])
    if fmt == "tar":
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, content in (("dir/notes.txt", b"notes\n" * 100), ("dir/disk.img", disk)):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(content), 1714521600, 0o644
                tar.addfile(info, io.BytesIO(content))
        return Seed(out.getvalue(), disk, ["--filter=tar", "tar-entry=dir/disk.img"])
    if fmt == "zip":
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as z:
            z.writestr(zipfile.ZipInfo("notes.txt", (2024, 5, 1, 0, 0, 0)), b"notes\n" * 100, zipfile.ZIP_STORED)
            z.writestr(zipfile.ZipInfo("disk.img", (2024, 5, 1, 0, 0, 0)), disk, zipfile.ZIP_DEFLATED)
        return Seed(out.getvalue(), disk, ["--filter=zip", "zip-entry=disk.img"])
    if fmt in ("luks1", "luks2"):
        image, key = (luks1_image if fmt == "luks1" else luks2_image)(disk, PASSPHRASE, rng)
        keyfile = work / "key"
        keyfile.write_bytes(PASSPHRASE)
        return Seed(image, disk, ["--filter=luks", f"keyfile={keyfile}", "luks-kdf-max-seconds=2"], key)
    if fmt == "qcow2":  # compressed 4 KiB clusters: header, L1, L2 and descriptors in the first bytes
        raw = work / "disk.img"
        raw.write_bytes(disk)
        subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k", raw,
                        work / "seed.qcow2"], check=True, capture_output=True, timeout=60, env=ENV)
        # backing=none: a mutated backing file name must not reach the other cases of the directory.
        return Seed((work / "seed.qcow2").read_bytes(), disk, ["--filter=qcow2", "backing=none"])
    if fmt == "xva":
        from fixtures.xva import XvaDisk, xva_members, write_tar
        return Seed(write_tar(work / "seed.xva", xva_members([XvaDisk(disk * 20)], "xxhash", "vm")).read_bytes(),
                    disk * 20, ["--filter=xva"])
    if fmt in QEMU_IMAGES:  # a sparse 1 MiB disk: holes between the 64 KiB pieces
        qemu_format, options = QEMU_IMAGES[fmt]
        sparse = bytearray(16 * DISK_SIZE)
        for piece in range(0, 16, 3):
            sparse[piece * DISK_SIZE:(piece + 1) * DISK_SIZE] = disk
        raw = work / "disk.img"
        raw.write_bytes(sparse)
        image = work / f"seed.{fmt}"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", qemu_format, *[a for o in options for a in ("-o", o)],
                        raw, image], check=True, capture_output=True, timeout=60, env=ENV)
        return Seed(image.read_bytes(), bytes(sparse), [f"--filter={fmt}"])
    if fmt == "bzip2":  # two streams, 100 kB blocks: several blocks
        return Seed(bz2.compress(disk * 8, 1) + bz2.compress(disk, 9), disk * 9, ["--filter=bzip2", "bzip2-threads=1"])
    if fmt == "lzip":  # several members
        raw = work / "disk.img"
        raw.write_bytes(disk * 8)
        blob = subprocess.run(["lzip", "-c", "-b", "128KiB", raw], check=True, capture_output=True, timeout=60,
                              env=ENV).stdout
        return Seed(blob, disk * 8, ["--filter=lzip"])
    raise SystemExit(f"unknown format {fmt}")


# -- Mutations -------------------------------------------------------------------------------------
EXTREMES = [b"\xff" * 8, b"\0" * 8, b"\x7f" + b"\xff" * 7, b"\x80" + b"\0" * 7, b"\xff\xff\xff\x7f"]


def mutate_bytes(rng: random.Random, data: bytes, hot: tuple[int, int]) -> bytes:
    """Flip, overwrite with extreme values, insert, delete or truncate; mostly within `hot`."""
    raw = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not raw:
            break
        lo, hi = (hot if rng.random() < 0.8 else (0, len(raw)))
        pos = rng.randrange(min(lo, len(raw) - 1), max(min(hi, len(raw)), min(lo, len(raw) - 1) + 1))
        kind = rng.random()
        if kind < 0.4:
            raw[pos] ^= 1 << rng.randrange(8)
        elif kind < 0.6:
            extreme = rng.choice(EXTREMES)
            raw[pos:pos + len(extreme)] = extreme
        elif kind < 0.7:
            raw[pos:pos] = rng.randbytes(rng.randint(1, 64))
        elif kind < 0.8:
            del raw[pos:pos + rng.randint(1, 64)]
        elif kind < 0.9:
            del raw[rng.randrange(len(raw)):]  # truncation
        else:
            raw[pos] = rng.randrange(256)
    return bytes(raw)


def hot_range(fmt: str, seed: Seed) -> tuple[int, int]:
    """Where mutations do the most: headers, indexes, tables."""
    size = len(seed.data)
    return {"gzip": (0, 64), "xz": (size - 256, size), "zstd": (0, size), "tar": (0, 2048),
            "zip": (size - 300, size), "luks1": (0, 1024), "luks2": (0, 32768), "xva": (0, 4096),
            "qcow2": (0, min(size, 32768)), "vhdx": (0, 4 << 20), "vdi": (0, 2048), "bzip2": (0, size),
            "lzip": (0, size)}[fmt]


def image_hot_range(rng: random.Random, fmt: str, size: int) -> tuple[int, int]:
    """VMDK: the header, grain directory and tables, or the footer's copy of the header;
    VHD: the footer copy, the dynamic header and the BAT, or the footer."""
    start = rng.random() < 0.5
    if fmt == "vmdk":
        return (0, 4096) if start else (size - 2048, size)
    return (0, 3072) if start else (size - 512, size)


def mutate_luks2_json(rng: random.Random, image: bytes) -> bytes:
    """Change values of the LUKS2 metadata and give both copies valid checksums again."""
    header_size = struct.unpack_from(">Q", image, 8)[0]
    extremes = [-1, 0, 2 ** 63, 2 ** 64, "x", None, [], {}, "18446744073709551615", "512", "dynamic", "9" * 30]
    text = image[4096:header_size].split(b"\0", 1)[0]
    metadata = json.loads(text)

    def change(node, depth=0) -> None:
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        for key in keys:
            if rng.random() < 0.1:
                if isinstance(node, dict) and rng.random() < 0.3:
                    del node[key]
                else:
                    node[key] = rng.choice(extremes)
            elif isinstance(node[key], (dict, list)) and depth < 6:
                change(node[key], depth + 1)
    change(metadata)
    new_text = json.dumps(metadata, separators=(",", ":")).encode()[:header_size - 4097]
    out = bytearray(image)
    for offset in (0, header_size):
        area = bytearray(out[offset:offset + header_size])
        area[4096:] = new_text.ljust(header_size - 4096, b"\0")
        area[448:512] = bytes(64)
        area[448:480] = hashlib.sha256(area).digest()
        out[offset:offset + header_size] = area
    return bytes(out)


BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE v [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">
<!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;"><!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;">
<!ENTITY g "&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;"><!ENTITY h "&g;&g;&g;&g;&g;&g;&g;&g;&g;&g;">]>
<value><struct><member><name>version</name><value>&h;</value></member></struct></value>"""
EXTERNAL = b"""<?xml version="1.0"?>
<!DOCTYPE v [<!ENTITY x SYSTEM "file:///etc/passwd">]><value>&x;</value>"""


def mutate_xva(rng: random.Random, archive: bytes) -> bytes:
    """ova.xml made hostile (an entity bomb, an external entity, deep nesting) or damaged, and
    now and then a chunk's bytes; the tar rewritten around them."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar.getmembers()]  # type: ignore[union-attr]
    choice = rng.random()
    if choice < 0.15:
        ova = BOMB
    elif choice < 0.25:
        ova = EXTERNAL
    elif choice < 0.35:
        ova = b"<value>" * 10000
    else:
        text = members[0][1].decode()
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(text))
            text = text[:pos] + rng.choice(["<", ">", "&", "</value>", "<struct>", "Ref:99", "-1", "99999999999999999999",
                                            "", "\x00"]) + text[pos + rng.randint(0, 20):]
        ova = text.encode("utf-8", "replace")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for index, (member, data) in enumerate(members):
            data = ova if index == 0 else mutate_bytes(rng, data, (0, len(data))) if rng.random() < 0.05 else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return out.getvalue()


def mutate(fmt: str, rng: random.Random, seed: Seed) -> bytes:
    if fmt == "luks2" and rng.random() < 0.5:
        return mutate_luks2_json(rng, seed.data)
    if fmt == "xva" and rng.random() < 0.7:
        return mutate_xva(rng, seed.data)
    if fmt in ("vmdk", "vhd"):
        return mutate_bytes(rng, seed.data, image_hot_range(rng, fmt, len(seed.data)))
    return mutate_bytes(rng, seed.data, hot_range(fmt, seed))


# -- References (not our code) -------------------------------------------------------------------
def gzip_reference(data: bytes) -> bytes:
    """gzip(1)'s rules with Python's zlib: members one after another, checked (CRC-32, ISIZE);
    zero padding, or anything that is not a member, after the last one is ignored."""
    out, rest = [], data
    while True:
        inflater = zlib.decompressobj(31)
        out.append(inflater.decompress(rest))
        if not inflater.eof:
            raise zlib.error("truncated member")
        rest = inflater.unused_data
        if not rest.startswith(b"\x1f\x8b"):
            return b"".join(out)


def zstd_reference(data: bytes) -> bytes:
    """zstandard, frame after frame (skippable frames skipped); a frame cut short is an error."""
    out = []
    while data:
        if len(data) >= 8 and struct.unpack_from("<I", data)[0] & 0xFFFFFFF0 == 0x184D2A50:
            data = data[8 + struct.unpack_from("<I", data, 4)[0]:]
            continue
        frame = zstandard.ZstdDecompressor().decompressobj()
        out.append(frame.decompress(data))
        if not frame.eof:
            raise zstandard.ZstdError("a frame cut short")
        data = frame.unused_data
    return b"".join(out)


def tar_reference(data: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.extractfile("dir/disk.img")
        assert member is not None
        return member.read()


def zip_reference(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return z.read("disk.img")


def luks_layout(fmt: str, data: bytes, header: int = 0) -> tuple[int, int | None, str, int, int]:
    """(payload offset, size or None for "to the end", cipher, sector size, iv tweak) as the
    header (LUKS2: the one at `header`) says, read by the specification."""
    if fmt == "luks1":
        name, mode = (part.split(b"\0", 1)[0].decode() for part in struct.unpack_from(">32s32s", data, 8))
        return struct.unpack_from(">I", data, 104)[0] * 512, None, f"{name}-{mode}", 512, 0
    header_size = struct.unpack_from(">Q", data, header + 8)[0]
    segment = json.loads(data[header + 4096:header + header_size].split(b"\0", 1)[0])["segments"]["0"]
    size = None if segment["size"] == "dynamic" else int(segment["size"])
    return int(segment["offset"]), size, segment["encryption"], int(segment["sector_size"]), int(segment["iv_tweak"])


def luks_reference(fmt: str, data: bytes, key: bytes) -> bytes:
    offset, size, cipher, sector, tweak = luks_layout(fmt, data)
    if fmt == "luks2" and offset % 512:
        # cryptsetup refuses a header whose segment is not sector-aligned and reads the
        # secondary one (at the primary's header size), as we do.
        offset, size, cipher, sector, tweak = luks_layout(fmt, data, struct.unpack_from(">Q", data, 8)[0])
    if cipher != "aes-xts-plain64" or tweak or sector != 512 or not 0 < offset < len(data):
        raise ValueError("a layout the reference does not decrypt")
    payload = data[offset:] if size is None else data[offset:offset + size]
    if size is not None and (len(payload) != size or size % 512):
        raise ValueError("the segment does not fit the file")
    return reference_crypt(cipher, key, payload[:len(payload) // 512 * 512], 512, encrypt=False)


def qemu_reference(fmt: str, data: bytes) -> bytes:
    """qemu-img convert's decode of an image (refused past QEMU_MAX_SIZE, as too slow to compare; a
    backing file name it finds is no backing file: none exists)."""
    qemu_format = QEMU_FORMATS[fmt]
    with tempfile.TemporaryDirectory(prefix="nbdf-fuzz-qemu-") as work:
        image, out = Path(work) / "image", Path(work) / "out"
        image.write_bytes(data)
        info = subprocess.run(["qemu-img", "info", "-f", qemu_format, "--output=json", image], capture_output=True,
                              check=True, timeout=30, env=ENV)
        if json.loads(info.stdout)["virtual-size"] > QEMU_MAX_SIZE:
            raise ValueError("a disk too large to compare")
        subprocess.run(["qemu-img", "convert", "-f", qemu_format, "-O", "raw", image, out], capture_output=True,
                       check=True, timeout=30, env=ENV)
        return out.read_bytes()


def bzip2_reference(data: bytes) -> bytes:
    """Python's bz2 (libbz2), stream after stream as bzip2 -d reads them; a stream cut short is an error."""
    out = []
    while data:
        stream = bz2.BZ2Decompressor()
        out.append(stream.decompress(data))
        if not stream.eof:
            raise OSError("a stream cut short")
        data = stream.unused_data
    return b"".join(out)


def lzip_reference(data: bytes) -> bytes:
    return subprocess.run(["lzip", "-dc"], input=data, capture_output=True, check=True, timeout=30, env=ENV).stdout


def reference(fmt: str, data: bytes, seed: Seed) -> bytes | None:
    """What the reference decoder makes of `data`; None when it refuses it (as corrupt, or as
    something it does not support: see corrupt())."""
    decoders: dict[str, Callable[[bytes], bytes]] = {
        "gzip": gzip_reference, "xz": lambda d: lzma.decompress(d, lzma.FORMAT_XZ), "zstd": zstd_reference,
        "tar": tar_reference, "zip": zip_reference,
        "luks1": lambda d: luks_reference("luks1", d, seed.master_key),
        "luks2": lambda d: luks_reference("luks2", d, seed.master_key),
        "bzip2": bzip2_reference, "lzip": lzip_reference,
        **{image: lambda d, image=image: qemu_reference(image, d) for image in QEMU_FORMATS}}
    try:
        return decoders[fmt](data)
    except Exception:  # noqa: BLE001 - any refusal of the reference counts the same
        return None


def corrupt(fmt: str, data: bytes, seed: Seed) -> bool:
    """Whether the reference refuses `data` as damaged, rather than as using something it does
    not implement (zipfile: a "version needed" above 6.3, strong encryption) or for names, not
    data: a name flagged UTF-8 that is not, or a local header's name other than the central
    directory's (unzip -t passes both, with a warning; we read members by the central directory)."""
    if fmt != "zip":
        return reference(fmt, data, seed) is None
    try:
        zip_reference(data)
    except (NotImplementedError, UnicodeDecodeError):
        return False
    except zipfile.BadZipFile as e:
        return not str(e).startswith("File name in directory")
    except Exception:  # noqa: BLE001 - refused as damaged
        return True
    return False


# -- Refusals explained: the server stricter than a lax reference, for a named reason ------------
SEEKABLE_MAGIC, SEEK_TABLE_MAGIC = 0x8F92EAB1, 0x184D2A5E


def zstd_justified(data: bytes, seed: Seed) -> str | None:
    """The seek table of the seekable format as zstd's contrib/seekable_format reads it
    (zstdseek_decompress.c: the footer, the skippable frame around the table, then per frame
    the XXH64 of its output against the entry's checksum, else corruption_detected).  zstandard
    and `zstd -t` skip the table, and the seed's frames carry no checksum of their own: a
    damaged byte of a raw or literal block decodes to other bytes without an error."""
    if len(data) < 17 or struct.unpack_from("<I", data, len(data) - 4)[0] != SEEKABLE_MAGIC:
        return None
    count, descriptor = struct.unpack_from("<IB", data, len(data) - 9)
    if descriptor & 0x7C:
        return "zstd seek table: reserved bits set"
    table = 8 + count * (12 if descriptor & 0x80 else 8) + 9
    start = len(data) - table
    if start < 0 or struct.unpack_from("<II", data, start) != (SEEK_TABLE_MAGIC, table - 8):
        return "zstd seek table: its footer does not match its frame (the table is damaged)"
    frames, rest = [], data[:start]
    while rest:  # the frames before the table, as zstandard finds them
        decoder = zstandard.ZstdDecompressor().decompressobj()
        try:
            out = decoder.decompress(rest)
        except zstandard.ZstdError:
            return "zstd seek table: its sizes do not match the frames (the table is damaged)"
        frames.append((len(rest) - len(decoder.unused_data), out))
        rest = decoder.unused_data
    step = 12 if descriptor & 0x80 else 8
    entries = [struct.unpack_from("<II", data, start + 8 + n * step) for n in range(count)]
    if entries != [(length, len(out)) for length, out in frames]:
        return "zstd seek table: its sizes do not match the frames (the table is damaged)"
    if descriptor & 0x80:
        for n, (_, out) in enumerate(frames):
            if xxhash.xxh64_intdigest(out) & 0xFFFFFFFF != struct.unpack_from("<I", data, start + 16 + n * 12)[0]:
                if b"".join(out for _, out in frames) == seed.disk:
                    return "zstd seek table: a checksum damaged (the data intact)"
                return "zstd seek table: a checksum mismatch catches damaged data (no checksum in the frames)"
    return None


def zip_justified(data: bytes) -> str | None:
    """What unzip -t or bsdtar refuse and zipfile lets through (zipfile reads one member by the
    central directory and checks its CRC-32, but neither the central directory's bounds nor
    that the local header agrees with it), and the multi-disk archives we refuse as unsupported.
    Read by APPNOTE 4.3.12-4.3.16: the last end record, the records of the central directory,
    the local headers."""
    position = data.rfind(b"PK\x05\x06")
    if position < 0 or position + 22 > len(data):
        return None
    _, disk, cd_disk, _, _, cd_size, cd_offset, _ = struct.unpack_from("<4sHHHHIIH", data, position)
    if disk or cd_disk:
        return "zip: the end record names another disk (split archives: unsupported, refused by name)"
    prefix = position - cd_size - cd_offset  # bytes before the archive (self-extracting stubs)
    if prefix < 0:
        return "zip: the central directory does not fit before its end record (unzip -t refuses it)"
    central, at = data[cd_offset + prefix:position], 0
    while at + 46 <= len(central) and central[at:at + 4] == b"PK\x01\x02":
        (flags, crc, compressed, size, name_length, extra_length, comment_length,
         offset) = struct.unpack_from("<8xH6xIIIHHH8xI", central, at)
        end = at + 46 + name_length + extra_length + comment_length
        if end > len(central):
            return "zip: a central directory record runs past the central directory (unzip -t and bsdtar refuse it)"
        extra, tags, field_at = central[at + 46 + name_length:at + 46 + name_length + extra_length], set(), 0
        while field_at + 4 <= len(extra):
            tag, length = struct.unpack_from("<HH", extra, field_at)
            tags.add(tag)
            field_at += 4 + length
        if 0xFFFFFFFF in (compressed, size, offset) and 1 not in tags:
            return "zip: a central directory field is 0xFFFFFFFF without a zip64 extra field"
        local = offset + prefix
        if (offset != 0xFFFFFFFF and not flags & 8 and data[local:local + 4] == b"PK\x03\x04"
                and struct.unpack_from("<III", data, local + 14) != (crc, compressed, size)):
            return "zip: the central directory and a local header disagree on CRC-32 or sizes (bsdtar refuses)"
        at = end
    return None


def tar_justified(data: bytes) -> str | None:
    """A header checksum field that GNU tar and bsdtar do not read as octal: tarfile strips the
    field with str.strip(), which takes \\x1c-\\x1f (and other bytes) for spaces."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            headers = {offset for m in tar.getmembers() for offset in (m.offset, m.offset_data - 512)}
    except Exception:  # noqa: BLE001
        return None
    for offset in sorted(headers):
        if not re.fullmatch(rb" *[0-7]+[ \0]*", data[offset + 148:offset + 156]):
            return ("tar: a header checksum field that is not octal (tarfile strips it as spaces; "
                    "GNU tar and bsdtar refuse it)")
    return None


def luks2_accepted_by_cryptsetup(data: bytes) -> str | None:
    """Why a LUKS2 header that `cryptsetup open --test-passphrase` (2.6) accepts is refused all
    the same: a digest it cannot check, which its PBKDF2_digest_verify passes (each early exit
    after the salt is decoded returns 0, "verified": such a header opens with any passphrase);
    a number past 2^64-1 (json-c clamps it and cryptsetup reads on); a segment that is not
    'crypt' (not read by --test-passphrase; refused by name, as unsupported)."""
    header_size = struct.unpack_from(">Q", data, 8)[0]
    reasons = []
    for offset in (0, header_size):
        try:
            metadata = json.loads(data[offset + 4096:offset + header_size].split(b"\0", 1)[0])
        except Exception:  # noqa: BLE001 - this copy damaged: cryptsetup read the other one
            continue

        def numbers(node):
            if isinstance(node, dict):
                return [n for v in node.values() for n in numbers(v)]
            if isinstance(node, list):
                return [n for v in node for n in numbers(v)]
            return [node] if isinstance(node, int) and not isinstance(node, bool) else []

        if any(n > 2 ** 64 - 1 for n in numbers(metadata)):
            reasons.append("luks2: a number past 2^64-1 in the metadata (cryptsetup clamps it and reads on)")
        for digest in metadata.get("digests", {}).values() if isinstance(metadata, dict) else ():
            try:
                salt = base64.b64decode(digest["salt"], validate=True)
                value = base64.b64decode(digest["digest"], validate=True)
                size = hashlib.new(digest["hash"]).digest_size
                usable = (len(salt) == 32 and 20 <= len(value) <= 64 and len(value) in (20, size)
                          and isinstance(digest["iterations"], int) and digest["iterations"] > 0)
            except Exception:  # noqa: BLE001 - missing, mistyped, not base64, an unknown hash
                usable = False
            if not usable:
                reasons.append("luks2: a digest cryptsetup cannot check, which it passes (any passphrase opens it)")
        segments = metadata.get("segments", {}) if isinstance(metadata, dict) else {}
        if any(isinstance(seg, dict) and seg.get("type") != "crypt" for seg in segments.values()):
            reasons.append("luks2: a segment type other than 'crypt' (unsupported, refused by name)")
    return reasons[0] if reasons else None


def luks_justified(fmt: str, data: bytes, work: Path) -> str | None:
    """The reference decrypts with the volume key the seed was made with: it reads neither the
    header checksums nor the keyslots and digests.  cryptsetup, given the passphrase, is the
    judge of those (`open --test-passphrase`: the header, the keyslot and the digest, no mapping)."""
    if shutil.which("cryptsetup", path=ENV["PATH"]) is None:
        return None
    image, key = work / "luks-judge.img", work / "luks-judge.key"
    image.write_bytes(data)
    key.write_bytes(PASSPHRASE)
    try:
        run = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--disable-locks", "--key-file", key,
                              "--type", fmt, image], check=False, capture_output=True, timeout=5, env=ENV,
                             text=True, errors="replace")
    except subprocess.TimeoutExpired:
        return f"{fmt}: cryptsetup still deriving the key after 5 s (the server's luks-kdf-max-seconds=2 refuses it)"
    if run.returncode == 0:
        return luks2_accepted_by_cryptsetup(data) if fmt == "luks2" else None
    lines = [line for line in run.stderr.splitlines() if line.strip()] or [f"exit status {run.returncode}"]
    return f"{fmt}: cryptsetup refuses it too ({lines[-1].replace(str(image), 'IMAGE')})"


PAST_EOF_PADDING = 16 << 20  # bytes of 0xA5 put where the file ends, to see whether qemu reads there
TRAILER = {"vhd": 512, "vmdk": 1024}  # a footer at the end of the file (VHD's; streamOptimized's footer and EOS)


def vhd_checksum_wrong(data: bytes) -> str | None:
    """The VHD spec's checksum ("the one's complement of the sum of all the bytes in the footer
    without the checksum field") of the footer and of the dynamic disk header; qemu only warns."""
    def wrong(block: bytes, field: int) -> bool:
        stored = struct.unpack_from(">I", block, field)[0]
        return stored != ~sum(block[:field] + bytes(4) + block[field + 4:]) & 0xFFFFFFFF
    footer = data[-512:]
    if len(footer) == 512 and wrong(footer, 64):
        return "vhd: the footer's checksum is wrong (qemu only warns)"
    header_offset = struct.unpack_from(">Q", footer, 16)[0] if len(footer) == 512 else 0
    header = data[header_offset:header_offset + 1024] if header_offset < len(data) else b""
    if len(header) == 1024 and header[:8] == b"cxsparse" and wrong(header, 36):
        return "vhd: the dynamic disk header's checksum is wrong (qemu only warns)"
    return None


def qcow2_points_past_the_end(data: bytes) -> bool:
    """Whether the active L1 table, an L2 table it names or a standard data cluster lies past the
    end of the file (docs/interop/qcow2.txt's layout, read here independently of the filter)."""
    cluster_bits, size, l1_size, l1_offset = struct.unpack_from(">I Q I Q", data, 20)
    incompatible = struct.unpack_from(">Q", data, 72)[0] if struct.unpack_from(">I", data, 4)[0] >= 3 else 0
    cluster = 1 << cluster_bits
    l2_entry = 16 if incompatible & (1 << 4) else 8  # extended L2: 128-bit entries
    if l1_offset + 8 * l1_size > len(data):
        return True
    for (l1_entry,) in struct.iter_unpack(">Q", data[l1_offset:l1_offset + 8 * l1_size]):
        l2_offset = l1_entry & 0x00FF_FFFF_FFFF_FE00
        if not l2_offset:
            continue
        if l2_offset + cluster > len(data):
            return True
        for index in range(0, cluster, l2_entry):
            entry = struct.unpack_from(">Q", data, l2_offset + index)[0]
            host = entry & 0x00FF_FFFF_FFFF_FE00
            if not entry & (1 << 62) and host and host + cluster > len(data):
                return True
    return False


def image_justified(fmt: str, data: bytes, before: bytes) -> str | None:
    """qemu reads the bytes past the end of an image file as zeroes (a table, a data block); the
    server fails such reads with EIO, as short data is never served as zeroes.  Shown by qemu
    itself: its decode (`before`, of `data` as it is) changes when bytes are put where the file
    ends (before the trailing footer, for formats that keep one there)."""
    if fmt == "vhd" and (reason := vhd_checksum_wrong(data)):
        return reason
    if fmt == "vdi" and len(data) >= 0x180 and struct.unpack_from("<I", data, 0x17C)[0]:
        return "vdi: a block extra size (cbBlockExtra) other than 0, refused by name (qemu and VirtualBox disagree)"
    if fmt == "vdi" and len(data) >= 0x50 and struct.unpack_from("<I", data, 0x4C)[0] not in (1, 2):
        return "vdi: an image type other than dynamic (1) or fixed (2), refused by name"
    if fmt == "qcow2" and qcow2_points_past_the_end(data):  # also beyond what the padding reaches
        return "qcow2: a table or data cluster lies past the end of the file (qemu reads zeroes there)"
    keep = TRAILER.get(fmt, 0)
    cut = len(data) - keep if keep and len(data) >= keep else len(data)
    padded = data[:cut] + b"\xa5" * PAST_EOF_PADDING + data[cut:]
    try:
        after = qemu_reference(fmt, padded)
    except Exception:  # noqa: BLE001 - what lies past the end decides whether qemu can read it at all
        after = None
    if after != before:
        return f"{fmt}: qemu reads past the end of the file as zeroes (the server fails those reads with EIO)"
    return None


def justified(fmt: str, data: bytes, expected: bytes, seed: Seed, work: Path) -> str | None:
    """Why the server may refuse an input the reference accepts (making `expected` of it), when the reference is lax
    (the format requires a check it does not make, as an independent tool shows) or the
    input uses something refused as unsupported; None leaves the case "stricter"."""
    try:
        if fmt == "zstd":
            return zstd_justified(data, seed)
        if fmt == "zip":
            return zip_justified(data)
        if fmt == "tar":
            return tar_justified(data)
        if fmt in ("luks1", "luks2"):
            return luks_justified(fmt, data, work)
        if fmt in QEMU_FORMATS:
            return image_justified(fmt, data, expected)
    except Exception:  # noqa: BLE001 - a damaged input the explanation cannot parse: unexplained
        return None
    return None


CHECKSUMMED = {"gzip", "xz", "zstd", "zip", "bzip2", "lzip"}  # all of the data served as good while the reference refuses: a finding


# -- Running cases through the server ------------------------------------------------------------
@dataclass
class Result:
    fmt: str
    seed: int
    cases: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)
    slowest: float = 0.0

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


class Server:
    """nbdformats serving every case file of a directory under the format's filter."""

    def __init__(self, seed: Seed, directory: Path, work: Path) -> None:
        self.socket = str(work / "sock")
        self.log_path = work / "server.log"
        self.log = open(self.log_path, "wb")
        self.seen = 0
        self.proc = subprocess.Popen([sys.executable, "-m", "nbdformats", "-f", "-U", self.socket, *seed.args[:1],
                                      "file", f"dir={directory}", *seed.args[1:]],
                                     cwd=ROOT, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL, env=ENV)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {self.log_path.read_text(errors='replace')}")
            time.sleep(0.01)

    def new_messages(self) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(self.seen)
            text = f.read()
        self.seen += len(text)
        return text.decode(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()
        if os.path.exists(self.socket):
            os.unlink(self.socket)


def read_all(h: nbd.NBD, size: int, expected: bytes | None) -> tuple[int, int, list[str]]:
    """Read the disk (sampled beyond SAMPLED); (reads ok, reads failing with EIO, wrong bytes)."""
    spots = [(0, size)] if size <= SAMPLED else [(0, SAMPLED // 4), (size // 2, SAMPLED // 4),
                                                 (size - SAMPLED // 4, SAMPLED // 4)]
    ok = failed = 0
    wrong = []
    for start, length in spots:
        for offset in range(start, start + length, READ):
            n = min(READ, start + length - offset)
            try:
                data = h.pread(n, offset)
            except nbd.Error as e:
                if e.errno not in ("EIO", "EFBIG", "ENOMEM"):
                    wrong.append(f"a read at {offset} failed with {e.errno}, not EIO")
                failed += 1
                continue
            ok += 1
            if expected is not None and data != expected[offset:offset + n]:
                wrong.append(f"bytes {offset}-{offset + n} differ from the reference" if offset + n <= len(expected)
                             else f"bytes {offset}-{offset + n} served, the reference has {len(expected)} bytes")
    return ok, failed, wrong


def write_check(fmt: str, h: nbd.NBD, size: int, rng: random.Random, case: Path, seed: Seed) -> list[str]:
    """A write must be refused on a read-only export; elsewhere read back, and found in the file
    by the reference (it may only change the member or the payload)."""
    if size < 4096:
        return []
    offset = rng.randrange(0, size - 4096 + 1, 512)
    block = rng.randbytes(4096)
    if h.is_read_only():
        try:
            h.pwrite(block, offset)
        except nbd.Error as e:
            return [] if e.errno in ("EPERM", "EROFS") else [f"a write to a read-only export failed with {e.errno}"]
        return ["a write to a read-only export succeeded"]
    try:
        h.pwrite(block, offset)
        h.flush()
    except nbd.Error as e:
        return [] if e.errno in ("EIO", "ENOSPC", "EINVAL") else [f"a write failed with {e.errno}"]
    if h.pread(4096, offset) != block:
        return ["a write did not read back"]
    written = reference(fmt, case.read_bytes(), seed)
    if written is not None and written[offset:offset + 4096] != block:
        return [f"the reference does not find the write at {offset} in the file"]
    return []


def run_case(fmt: str, index: int, server: Server, case: Path, expected: bytes | None, seed: Seed,
             rng: random.Random, result: Result) -> None:
    h = nbd.NBD()
    h.set_strict_mode(0)  # send what a hostile client would, e.g. writes to a read-only export
    h.set_export_name(case.name)
    problems: list[str] = []
    try:
        h.connect_unix(server.socket)
    except nbd.Error:
        outcome = "stricter" if expected is not None else "refused"
    else:
        size = h.get_size()
        ok, failed, wrong = read_all(h, size, expected)
        problems += wrong
        if expected is not None and size != len(expected) and not failed:
            problems.append(f"a disk of {size} bytes served without an error, the reference has {len(expected)}")
        if expected is None and not failed and fmt in CHECKSUMMED and size and corrupt(fmt, case.read_bytes(), seed):
            problems.append("served all of the data, which the reference refuses as corrupt")
        problems += write_check(fmt, h, size, rng, case, seed)
        outcome = ("match" if not failed else "stricter") if expected is not None else \
            ("served" if not failed else "read with EIO")
        h.shutdown()
    if outcome == "stricter" and expected is not None and \
            (reason := justified(fmt, case.read_bytes(), expected, seed, case.parent.parent)):
        outcome = f"justified: {reason}"
    del h  # closes the handle (and its socket)
    messages = server.new_messages()
    # A refused open must give the filter's own message: another one is an exception it did not expect.
    component = seed.args[0].removeprefix("--filter=")
    unclear = [line for line in messages.splitlines()
               if "cannot open export" in line and not line.split(f"'{case.name}': ", 1)[-1].startswith(component)]
    if "Traceback" in messages or "internal error" in messages or unclear:
        problems.append(f"the server logged:\n{messages[-3000:]}")
    if server.proc.poll() is not None:
        problems.append(f"the server died ({server.proc.returncode}):\n{messages[-3000:]}")
    if problems:
        result.findings.append(f"{fmt} seed {result.seed} case {index}: " + "; ".join(problems))
        outcome = "finding"
    result.count(outcome)


def run_through_server(fmt: str, seed_number: int, cases: int, batch: int, case_timeout: float, work: Path,
                       keep: Path | None, only: int | None) -> Result:
    rng = random.Random(seed_number)
    seed = make_seed(fmt, rng, work)
    result = Result(fmt, seed_number)
    directory = work / "cases"
    index = 0
    while index < cases:
        directory.mkdir()
        todo = []
        for number in range(index, min(cases, index + batch)):
            data = mutate(fmt, rng, seed) if number else seed.data  # case 0: the valid seed
            if only is not None and number != only:
                continue
            case = directory / f"case{number}"
            case.write_bytes(data)
            todo.append((number, case, reference(fmt, data, seed)))
        if todo:
            server = Server(seed, directory, work)
            try:
                for number, case, expected in todo:
                    started = time.monotonic()
                    run_case(fmt, number, server, case, expected, seed, random.Random(f"{seed_number}/{number}"),
                             result)
                    elapsed = time.monotonic() - started
                    result.slowest = max(result.slowest, elapsed)
                    if elapsed > case_timeout:
                        result.findings.append(f"{fmt} seed {seed_number} case {number} took {elapsed:.1f} s")
                    if keep is not None and result.findings and f"case {number}" in result.findings[-1]:
                        keep.mkdir(parents=True, exist_ok=True)
                        shutil.copy(case, keep / f"{fmt}-seed{seed_number}-case{number}")
                    result.cases += 1
                    if server.proc.poll() is not None:
                        break
            finally:
                server.stop()
        shutil.rmtree(directory)
        index += batch
    if only is None and result.outcomes.get("match", 0) == 0:
        result.findings.append(f"{fmt}: the valid seed (case 0) did not match its reference")
    return result


# -- XVA: one archive per server, so in-process through the filter chain ----------------------------
def run_in_process(fmt: str, seed_number: int, cases: int, work: Path, keep: Path | None,
                   only: int | None) -> Result:
    from nbdformats.api.chain import Chain
    from nbdformats.api.errors import ConfigError, NBDError
    from nbdformats.registry import load_filter, load_plugin

    logging.disable(logging.CRITICAL)  # the filter's messages about bad chunks: expected here
    rng = random.Random(seed_number)
    seed = make_seed(fmt, rng, work)
    result = Result(fmt, seed_number)
    case = work / "case"
    for number in range(cases):
        data = mutate(fmt, rng, seed) if number else seed.data
        if only is not None and number != only:
            continue
        case.write_bytes(data)
        chain = Chain([load_filter("xva")()], load_plugin("file")())
        try:
            chain.configure({0: [], 1: [("file", str(case))]})
            chain.get_ready()
            top = chain.open(True, "")
            try:
                size = top.get_size()
                for offset in range(0, min(size, SAMPLED), READ):
                    buf = bytearray(min(READ, size - offset))
                    try:
                        top.pread(memoryview(buf), offset, 0)
                    except NBDError:
                        pass
            finally:
                top.close()
            result.count("served" if number else "match")
        except (ConfigError, NBDError):
            result.count("refused")
        except Exception:  # noqa: BLE001 - what the fuzzer looks for
            result.findings.append(f"{fmt} seed {seed_number} case {number}: {traceback.format_exc(limit=6)}")
            result.count("finding")
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(case, keep / f"{fmt}-seed{seed_number}-case{number}")
        finally:
            chain.cleanup()
        result.cases += 1
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=400, help="cases per server")
    parser.add_argument("--only", type=int, help="replay this case number alone")
    parser.add_argument("--case-timeout", type=float, default=10.0)
    parser.add_argument("--keep-dir", type=Path, help="copy the inputs of findings here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix=f"nbdf-{args.format}-fuzz-"))
    started = time.monotonic()
    try:
        if args.format == "xva":
            result = run_in_process(args.format, args.seed, args.cases, work, args.keep_dir, args.only)
        else:
            result = run_through_server(args.format, args.seed, args.cases, args.batch, args.case_timeout, work,
                                        args.keep_dir, args.only)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"format": result.fmt, "seed": result.seed, "cases": result.cases, "outcomes": result.outcomes,
              "seconds": round(time.monotonic() - started, 1), "slowest": round(result.slowest, 2),
              "findings": result.findings[:5]}
    print(json.dumps(report))
    return 1 if result.findings else 0


if __name__ == "__main__":
    sys.exit(main())
