"""LUKS1 and LUKS2 headers: parsed from bytes into one `Volume` description (sans-IO).

`read_volume(read, device_size)` takes a `read(offset, length) -> bytes` function, so it runs the
same over a file, an NBD layer or bytes in a test.  Specs quoted below:
LUKS1 On-Disk Format Specification 1.2.3 (big-endian fields) and LUKS2 On-Disk Format
Specification 1.1.x (binary header, then JSON metadata; two copies).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import check_size
from ..readers import Reader
from .cipher import CipherSpec, parse_cipher_spec
from .errors import LuksError
from .kdf import Argon2, Kdf, Pbkdf2, hash_name
from .structs import (LUKS1_HEADER, LUKS1_HEADER_SIZE, LUKS1_KEY_DISABLED, LUKS1_KEY_ENABLED, LUKS1_KEYSLOT,
                      LUKS1_KEYSLOTS, LUKS2_BINARY_SIZE, LUKS2_CHECKSUM, LUKS2_HEADER, LUKS2_HEADER_SIZES, MAGIC,
                      MAGIC_SECONDARY, SECTOR)

@dataclass(frozen=True)
class Digest:
    """How to check a candidate volume key: PBKDF2 of the key must give `value`."""

    kdf: Pbkdf2
    value: bytes


@dataclass(frozen=True)
class Keyslot:
    index: int
    priority: int  # LUKS2: 0 ignore (unless asked for by number), 1 normal, 2 high
    kdf: Kdf
    area_cipher: CipherSpec  # encrypts the key material, in 512-byte sectors from IV 0
    area_key_size: int  # length of the KDF output
    area_offset: int
    area_size: int
    stripes: int
    af_hash: str
    key_size: int  # volume key size
    digest: Digest

    @property
    def material_size(self) -> int:
        """Bytes of split key material to read and decrypt (whole 512-byte sectors)."""
        return -(-self.key_size * self.stripes // SECTOR) * SECTOR


@dataclass(frozen=True)
class Segment:
    """The encrypted payload: `size` None means up to the end of the device."""

    offset: int
    size: int | None
    cipher: CipherSpec
    sector_size: int
    iv_tweak: int  # added to the IV sector number (512-byte units)


@dataclass(frozen=True)
class Volume:
    version: int
    uuid: str
    keyslots: tuple[Keyslot, ...]
    segment: Segment
    identity: bytes  # the header bytes: equal identity means the same volume key
    warnings: tuple[str, ...] = ()

    def payload_size(self, device_size: int) -> int:
        """Size of the decrypted disk on a device (file) of `device_size` bytes."""
        segment = self.segment
        if segment.size is not None:
            if segment.offset + segment.size > device_size:
                raise LuksError(f"the file is truncated: the encrypted data ends at "
                                f"{segment.offset + segment.size} but the file has {device_size} bytes")
            return segment.size
        if device_size < segment.offset:
            raise LuksError(f"the file is truncated: the encrypted data starts at {segment.offset} "
                            f"but the file has {device_size} bytes")
        available = device_size - segment.offset
        return available - available % segment.sector_size


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("ascii", "replace")


def read_volume(read: Reader, device_size: int) -> Volume:
    """Parse the LUKS header of a device; LuksError if it is not LUKS or is unsupported."""
    if device_size < 8:
        raise LuksError(f"not a LUKS image: the file has only {device_size} bytes")
    first = read(0, min(LUKS2_BINARY_SIZE, device_size))
    if first[:6] == MAGIC:
        version = struct.unpack_from(">H", first, 6)[0]
        if version == 1:
            return parse_luks1(first)
        if version != 2:
            raise LuksError(f"unsupported LUKS version {version}")
    return read_luks2(read, device_size)


# LUKS1 --------------------------------------------------------------------------------------

def parse_luks1(data: bytes) -> Volume:
    if len(data) < LUKS1_HEADER_SIZE:
        raise LuksError(f"the file is truncated: the LUKS1 header needs {LUKS1_HEADER_SIZE} bytes")
    (magic, version, cipher_name, cipher_mode, hash_spec, payload_offset, key_bytes, mk_digest,
     mk_digest_salt, mk_digest_iter, uuid) = LUKS1_HEADER.unpack_from(data, 0)
    if magic != MAGIC or version != 1:
        raise LuksError("not a LUKS1 header")
    cipher = parse_cipher_spec(f"{_text(cipher_name)}-{_text(cipher_mode)}")
    cipher.check_key_size(key_bytes)
    hash_spec_text = _text(hash_spec)
    hash_name(hash_spec_text)
    digest = Digest(Pbkdf2(hash_spec_text, mk_digest_iter, mk_digest_salt), mk_digest)
    keyslots = []
    warnings = []
    for index in range(LUKS1_KEYSLOTS):
        active, iterations, salt, material_offset, stripes = LUKS1_KEYSLOT.unpack_from(
            data, LUKS1_HEADER.size + index * LUKS1_KEYSLOT.size)
        if active == LUKS1_KEY_DISABLED:
            continue
        if active != LUKS1_KEY_ENABLED:
            warnings.append(f"LUKS1 keyslot {index} is damaged (state {active:#x}); skipped")
            continue
        keyslot = Keyslot(
            index=index, priority=1, kdf=Pbkdf2(hash_spec_text, iterations, salt), area_cipher=cipher,
            area_key_size=key_bytes, area_offset=material_offset * SECTOR,
            area_size=-(-key_bytes * stripes // SECTOR) * SECTOR, stripes=stripes, af_hash=hash_spec_text,
            key_size=key_bytes, digest=digest)
        try:
            check_keyslot(keyslot)
        except LuksError as e:
            warnings.append(f"LUKS1 keyslot {index} skipped: {e}")
            continue
        keyslots.append(keyslot)
    segment = Segment(offset=payload_offset * SECTOR, size=None, cipher=cipher, sector_size=SECTOR,
                      iv_tweak=0)
    return Volume(1, _text(uuid), tuple(keyslots), segment, bytes(data[:LUKS1_HEADER_SIZE]), tuple(warnings))


# LUKS2 --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Luks2Binary:
    magic: bytes
    version: int
    header_size: int
    seqid: int
    checksum_alg: str
    uuid: str
    header_offset: int
    checksum: bytes


def parse_luks2_binary(data: bytes) -> Luks2Binary:
    if len(data) < LUKS2_HEADER.size:
        raise LuksError("the LUKS2 binary header is truncated")
    (magic, version, header_size, seqid, _label, checksum_alg, _salt, uuid, _subsystem, header_offset,
     _padding, checksum) = LUKS2_HEADER.unpack_from(data, 0)
    return Luks2Binary(magic, version, header_size, seqid, _text(checksum_alg), _text(uuid), header_offset,
                       checksum)


def check_luks2_header(data: bytes, offset: int, magic: bytes) -> Luks2Binary:
    """Validate one LUKS2 header copy (binary header plus JSON area, `header_size` bytes) read at
    `offset`: magic, version, its own offset and the checksum over the whole area with the
    checksum field zeroed."""
    binary = parse_luks2_binary(data)
    if binary.magic != magic:
        raise LuksError(f"no LUKS2 magic at offset {offset}")
    if binary.version != 2:
        raise LuksError(f"version {binary.version} at offset {offset}")
    if binary.header_size not in LUKS2_HEADER_SIZES:
        raise LuksError(f"invalid header size {binary.header_size} at offset {offset}")
    if binary.header_offset != offset:
        raise LuksError(f"header at offset {offset} says it is at {binary.header_offset}")
    if len(data) < binary.header_size:
        raise LuksError(f"the header at offset {offset} is truncated")
    try:
        algorithm = hash_name(binary.checksum_alg)
    except LuksError as e:
        raise LuksError(f"header at offset {offset}: checksum: {e}") from None
    area = bytearray(data[:binary.header_size])
    area[LUKS2_CHECKSUM[0]:LUKS2_CHECKSUM[1]] = bytes(LUKS2_CHECKSUM[1] - LUKS2_CHECKSUM[0])
    digest = hashlib.new(algorithm, area).digest()
    if binary.checksum[:len(digest)] != digest:
        raise LuksError(f"bad {binary.checksum_alg} checksum in the header at offset {offset}")
    return binary


class _NoHeader(LuksError):
    """No header copy at all at an offset (as opposed to a damaged one)."""


def _load_copy(read: Reader, device_size: int, offset: int, magic: bytes) -> tuple[Luks2Binary, bytes]:
    """Read and check the header copy at `offset`: _NoHeader if there is none, LuksError if damaged."""
    if offset + LUKS2_BINARY_SIZE > device_size:
        raise _NoHeader(f"the file ends before offset {offset + LUKS2_BINARY_SIZE}")
    first = read(offset, LUKS2_BINARY_SIZE)
    if first[:6] != magic:
        raise _NoHeader(f"no LUKS2 header at offset {offset}")
    size = parse_luks2_binary(first).header_size
    if size not in LUKS2_HEADER_SIZES:
        raise LuksError(f"invalid header size {size} at offset {offset}")
    if offset + size > device_size:
        raise LuksError(f"the header at offset {offset} is truncated")
    data = read(offset, size)
    return check_luks2_header(data, offset, magic), data


def read_luks2(read: Reader, device_size: int) -> Volume:
    """Read both LUKS2 header copies; use the valid one with the highest seqid (sequence id).

    The secondary copy sits at the primary's header size; when the primary is unreadable, it is
    searched for at every allowed size, as cryptsetup does."""
    copies: list[tuple[Luks2Binary, bytes]] = []
    primary_problem: LuksError | None = None
    secondary_problem = "no secondary header found"
    try:
        copies.append(_load_copy(read, device_size, 0, MAGIC))
    except LuksError as e:
        primary_problem = e
    for offset in LUKS2_HEADER_SIZES:
        try:
            copies.append(_load_copy(read, device_size, offset, MAGIC_SECONDARY))
            break
        except _NoHeader:
            continue
        except LuksError as e:
            secondary_problem = str(e)
            break
    if not copies:
        if isinstance(primary_problem, _NoHeader) and secondary_problem == "no secondary header found":
            raise LuksError("not a LUKS image (no LUKS header at offset 0)")
        raise LuksError(f"no valid LUKS2 header (primary: {primary_problem}; secondary: {secondary_problem})")
    binary, data = max(copies, key=lambda copy: copy[0].seqid)
    warnings = []
    if primary_problem is not None:
        warnings.append(f"the primary LUKS2 header is damaged ({primary_problem}); "
                        f"using the secondary header at offset {binary.header_offset}")
    elif len(copies) == 1:
        warnings.append(f"the secondary LUKS2 header is damaged ({secondary_problem})")
    elif copies[0][0].seqid != copies[1][0].seqid:
        warnings.append(f"the LUKS2 header copies differ (seqid {copies[0][0].seqid} and "
                        f"{copies[1][0].seqid}); using the newer one")
    return parse_luks2_json(data, binary, tuple(warnings))


class _Json:
    """Typed access to the LUKS2 JSON metadata with errors that name the bad field."""

    def __init__(self, value: Any, path: str) -> None:
        self.value, self.path = value, path

    def get(self, key: str, optional: bool = False) -> "_Json":
        if not isinstance(self.value, dict):
            raise LuksError(f"LUKS2 metadata: {self.path} is not an object")
        if key not in self.value and not optional:
            raise LuksError(f"LUKS2 metadata: {self.path}.{key} is missing")
        return _Json(self.value.get(key), f"{self.path}.{key}")

    def items(self) -> list[tuple[str, "_Json"]]:
        if not isinstance(self.value, dict):
            raise LuksError(f"LUKS2 metadata: {self.path} is not an object")
        return [(k, _Json(v, f"{self.path}.{k}")) for k, v in self.value.items()]

    def text(self) -> str:
        if not isinstance(self.value, str):
            raise LuksError(f"LUKS2 metadata: {self.path} is not a string")
        return self.value

    def integer(self) -> int:
        """A number: JSON integer, or a decimal string (how LUKS2 stores 64-bit values), at most 2^64-1."""
        value = self.value
        if isinstance(value, str) and value.isascii() and value.isdigit():
            if len(value) > MAX_UINT64_DIGITS:
                raise LuksError(f"LUKS2 metadata: {self.path} has {len(value)} digits, more than a 64-bit number")
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise LuksError(f"LUKS2 metadata: {self.path} is not a non-negative number")
        if value > MAX_UINT64:
            raise LuksError(f"LUKS2 metadata: {self.path} is {value}, more than 2^64-1")
        return value

    def size(self) -> int:
        """A byte count or offset: at most 2^63-1, the largest a disk can have."""
        return check_size(self.integer(), f"LUKS2 metadata: {self.path}", error=LuksError)

    def base64(self) -> bytes:
        try:
            return base64.b64decode(self.text(), validate=True)
        except binascii.Error:
            raise LuksError(f"LUKS2 metadata: {self.path} is not base64") from None

    def strings(self) -> list[str]:
        if not isinstance(self.value, list) or not all(isinstance(v, str) for v in self.value):
            raise LuksError(f"LUKS2 metadata: {self.path} is not a list of strings")
        return self.value


def json_depth(text: bytes) -> int:
    """How deeply the arrays and objects of a JSON text nest (brackets inside strings not counted)."""
    outside_strings = re.sub(rb'"(?:[^"\\]|\\.)*"', b"", text)
    codes = np.frombuffer(outside_strings, dtype=np.uint8)
    steps = (np.isin(codes, (ord("["), ord("{"))).astype(np.int64)
             - np.isin(codes, (ord("]"), ord("}"))).astype(np.int64))
    return int(np.cumsum(steps).max(initial=0))


def parse_luks2_json(data: bytes, binary: Luks2Binary, warnings: tuple[str, ...] = ()) -> Volume:
    """Parse the JSON area of a checked LUKS2 header copy."""
    text = data[LUKS2_BINARY_SIZE:binary.header_size].split(b"\0", 1)[0]
    # The JSON area is up to 4 MiB: nested brackets could make the parser recurse too deep.
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise LuksError(f"LUKS2 metadata nests {depth} levels deep (real metadata: 4; at most {MAX_JSON_DEPTH})")
    try:
        root = _Json(json.loads(text), "")
    except (ValueError, UnicodeDecodeError) as e:
        raise LuksError(f"LUKS2 metadata is not valid JSON: {e}") from None
    config = root.get("config")
    requirements = config.get("requirements", optional=True)
    if requirements.value:
        mandatory = requirements.get("mandatory", optional=True).value or []
        if mandatory:
            raise LuksError(f"LUKS2 requirements not supported: {', '.join(map(str, mandatory))} "
                            "(is a reencryption in progress? finish it with cryptsetup)")
    segment_id, segment = _data_segment(root.get("segments"))
    digests = [(digest_id, digest) for digest_id, digest in root.get("digests").items()]
    volume_keyslots = []
    volume_warnings = list(warnings)
    keyslots = root.get("keyslots").items()
    for slot_id, slot in sorted(keyslots, key=lambda item: (_slot_number(item[0]) is None, _slot_number(item[0]) or 0)):
        try:
            keyslot = _luks2_keyslot(slot_id, slot, digests, segment_id)
        except LuksError as e:
            volume_warnings.append(f"keyslot {slot_id} skipped: {e}")
            continue
        if keyslot is not None:
            volume_keyslots.append(keyslot)
    return Volume(2, binary.uuid, tuple(volume_keyslots), segment, bytes(data), tuple(volume_warnings))


def _slot_number(text: str) -> int | None:
    """A keyslot id as a number: LUKS2 has keyslots 0 to 31 (cryptsetup's LUKS2_KEYSLOTS_MAX)."""
    if text.isascii() and text.isdigit() and len(text) <= 2 and int(text) < 32:
        return int(text)
    return None


def _data_segment(segments: _Json) -> tuple[str, Segment]:
    active = [(segment_id, s) for segment_id, s in segments.items()
              if not (s.get("flags", optional=True).value or [])]
    if len(active) != 1:
        raise LuksError(f"LUKS2 volumes with {len(active)} data segments are not supported "
                        "(a reencryption in progress?)")
    segment_id, segment = active[0]
    kind = segment.get("type").text()
    if kind != "crypt":
        raise LuksError(f"LUKS2 segment type {kind!r} is not supported (only 'crypt')")
    if segment.get("integrity", optional=True).value is not None:
        raise LuksError("LUKS2 authenticated encryption (integrity) is not supported")
    cipher = parse_cipher_spec(segment.get("encryption").text())
    sector_size = segment.get("sector_size").integer()
    if sector_size not in (512, 1024, 2048, 4096):
        raise LuksError(f"LUKS2 segment sector size {sector_size} is invalid")
    size_field = segment.get("size")
    size = None if size_field.value == "dynamic" else size_field.size()
    offset = segment.get("offset").size()
    if offset % SECTOR or (size is not None and size % sector_size):
        raise LuksError(f"LUKS2 segment offset {offset} or size {size} is not sector-aligned")
    iv_tweak = segment.get("iv_tweak").integer()
    return segment_id, Segment(offset=offset, size=size, cipher=cipher, sector_size=sector_size,
                               iv_tweak=iv_tweak)


def _luks2_keyslot(slot_id: str, slot: _Json, digests: list[tuple[str, _Json]],
                   segment_id: str) -> Keyslot | None:
    index = _slot_number(slot_id)
    if index is None:
        raise LuksError("its id is not a keyslot number (0 to 31)")
    if slot.get("type").text() != "luks2":
        return None  # e.g. "reencrypt" slots hold no volume key
    for _digest_id, digest in digests:
        if slot_id in digest.get("keyslots").strings():
            break
    else:
        raise LuksError("no digest refers to it")
    if segment_id not in digest.get("segments").strings():
        raise LuksError("its digest is not the data segment's")
    if digest.get("type").text() != "pbkdf2":
        raise LuksError(f"digest type {digest.get('type').text()!r} is not supported")
    digest_kdf = Pbkdf2(digest.get("hash").text(), digest.get("iterations").integer(), digest.get("salt").base64())
    hash_name(digest_kdf.hash)
    area = slot.get("area")
    if area.get("type").text() != "raw":
        raise LuksError(f"area type {area.get('type').text()!r} is not supported")
    area_cipher = parse_cipher_spec(area.get("encryption").text())
    area_key_size = area.get("key_size").integer()
    area_cipher.check_key_size(area_key_size)
    af = slot.get("af")
    if af.get("type").text() != "luks1":
        raise LuksError(f"anti-forensic splitter {af.get('type').text()!r} is not supported")
    hash_name(af.get("hash").text())
    kdf_field = slot.get("kdf")
    kdf_type = kdf_field.get("type").text()
    kdf: Kdf
    if kdf_type == "pbkdf2":
        kdf = Pbkdf2(kdf_field.get("hash").text(), kdf_field.get("iterations").integer(),
                     kdf_field.get("salt").base64())
        hash_name(kdf.hash)
    elif kdf_type in ("argon2i", "argon2id"):
        kdf = Argon2(kdf_type, kdf_field.get("time").integer(), kdf_field.get("memory").integer(),
                     kdf_field.get("cpus").integer(), kdf_field.get("salt").base64())
    else:
        raise LuksError(f"key derivation {kdf_type!r} is not supported")
    priority_field = slot.get("priority", optional=True)
    keyslot = Keyslot(
        index=index, priority=1 if priority_field.value is None else priority_field.integer(),
        kdf=kdf, area_cipher=area_cipher, area_key_size=area_key_size,
        area_offset=area.get("offset").size(), area_size=area.get("size").size(),
        stripes=af.get("stripes").integer(), af_hash=af.get("hash").text(),
        key_size=slot.get("key_size").integer(), digest=Digest(digest_kdf, digest.get("digest").base64()))
    check_keyslot(keyslot)
    if keyslot.material_size > keyslot.area_size:
        raise LuksError(f"{keyslot.stripes} stripes of {keyslot.key_size} bytes do not fit its "
                        f"{keyslot.area_size}-byte area")
    return keyslot


# Limits that keep a damaged or hostile header from asking for absurd work or memory: the
# largest values cryptsetup itself would write, or the fields' own ranges (the key derivation
# costs are checked by kdf.py).
MAX_STRIPES = 65536  # cryptsetup and qemu write 4000
MAX_JSON_DEPTH = 32
MAX_UINT64 = (1 << 64) - 1
MAX_UINT64_DIGITS = len(str(MAX_UINT64))
MAX_KEY_SIZE = 512


def check_keyslot(keyslot: Keyslot) -> None:
    """LuksError unless the keyslot's sizes and key derivation costs are within sane limits."""
    if not 1 <= keyslot.stripes <= MAX_STRIPES:
        raise LuksError(f"{keyslot.stripes} anti-forensic stripes (at most {MAX_STRIPES})")
    if not 1 <= keyslot.key_size <= MAX_KEY_SIZE:
        raise LuksError(f"volume key size {keyslot.key_size} is invalid")
    keyslot.kdf.check_costs()
    keyslot.digest.kdf.check_costs()
    if not 16 <= len(keyslot.digest.value) <= 1024:
        raise LuksError(f"the volume key digest has {len(keyslot.digest.value)} bytes")
