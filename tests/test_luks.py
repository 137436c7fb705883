"""luks filter: LUKS1 (qemu-img, cryptsetup) and LUKS2 (cryptsetup) images, read and write.

Decryption is checked against things we did not compute: data qemu wrote or reads back, and an
independent per-sector OpenSSL cipher keyed with the volume key cryptsetup dumps.
Needs: cryptsetup, qemu-utils, nbdkit (with its luks filter), libnbd-bin, python3-libnbd.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import pty
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from conftest import NBDFORMATS, nbdcopy_to_file, nbdsh, random_file, run, serve, serve_nbdkit, sha256_file
from fixtures.luks import (KEYFILE_DATA, add_key, cryptsetup_encrypt_in_place, cryptsetup_format, dump_layout, dump_volume_key, fast_pbkdf,
                           qemu_luks1, qemu_read_plain, qemu_write_plain, reference_crypt, rewrite_luks2_json)
from fixtures.reads import filter_over_file, read_range
from nbdformats.api.chain import EXTENT_DATA, FLAG_FAST_ZERO, Extents
from nbdformats.api.errors import ConfigError, NBDError
from nbdformats.filters import luks as luks_filter
from nbdformats.formats.luks import cipher as cipher_module
from nbdformats.formats.luks.cipher import RUN_BYTES, SectorCipher, parse_cipher_spec
from nbdformats.formats.luks.errors import LuksError
from nbdformats.formats.luks.header import read_volume
from nbdformats.formats.luks.unlock import keyslot_order
from nbdformats.formats.luks.kdf import af_merge

PASSPHRASE = "qemu secret"
MiB = 1024 * 1024


def open_luks(image: Path, *params: tuple[str, str], readonly: bool = False):
    chain = filter_over_file("luks", image, *params)
    return chain, chain.open(readonly=readonly, export_name="")


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("luks") / "key"
    path.write_bytes(KEYFILE_DATA)
    return path


@pytest.fixture(params=["openssl", "numpy"])
def implementation(request, monkeypatch) -> str:
    """Each test runs with both sector cipher implementations: the C extension calling OpenSSL per
    sector, and the numpy one used when the extension is not built."""
    if request.param == "numpy":
        monkeypatch.setattr(cipher_module, "_sectors", None)
    return request.param


def test_the_openssl_extension_is_built():
    # scripts/setup installs gcc, so the extension is there and the fast path is what is tested.
    assert cipher_module._sectors is not None
    cipher = SectorCipher(parse_cipher_spec("aes-xts-plain64"), os.urandom(64))
    assert cipher.implementation.startswith("OpenSSL")


def xts_encrypt_by_definition(key: bytes, data: bytes, sector: int) -> bytes:
    """One 512-byte sector by IEEE 1619's definition, from AES-ECB alone (OpenSSL's XTS, and so
    cryptography's, refuses keys with equal halves)."""
    def aes(k: bytes, block: bytes) -> bytes:
        return Cipher(algorithms.AES(k), modes.ECB()).encryptor().update(block)
    tweak = int.from_bytes(aes(key[32:], sector.to_bytes(16, "little")), "little")
    out = b""
    for j in range(0, len(data), 16):
        t = tweak.to_bytes(16, "little")
        out += bytes(a ^ b for a, b in zip(aes(key[:32], bytes(a ^ b for a, b in zip(data[j:j + 16], t))), t))
        tweak = (tweak << 1) ^ (0x87 if tweak >> 127 else 0)
        tweak &= (1 << 128) - 1
    return out


def test_xts_key_with_equal_halves_still_works():
    # OpenSSL refuses such a key; it is weak, not invalid, and a volume may have one.
    key = bytes(range(32)) * 2
    data = os.urandom(512)
    buf = bytearray(data)
    cipher = SectorCipher(parse_cipher_spec("aes-xts-plain64"), key)
    cipher.encrypt(memoryview(buf), 5)
    assert bytes(buf) == xts_encrypt_by_definition(key, data, 5)
    cipher.decrypt(memoryview(buf), 5)
    assert bytes(buf) == data


@pytest.mark.parametrize("spec", ["aes-xts-plain64", "aes-cbc-essiv:sha256"])
def test_partial_sectors_are_refused_by_both_implementations(implementation, spec):
    cipher = SectorCipher(parse_cipher_spec(spec), bytes(32))
    with pytest.raises(ValueError, match="not a whole number of 512-byte sectors"):
        cipher.decrypt(memoryview(bytearray(1000)), 0)


# Sans-IO pieces ---------------------------------------------------------------------------------

CIPHERS = [("aes-xts-plain64", 64), ("aes-xts-plain64", 32), ("aes-xts-plain", 64),
           ("aes-cbc-essiv:sha256", 32), ("aes-cbc-plain", 16), ("aes-cbc-plain64", 24)]


@pytest.mark.parametrize("spec,key_size", CIPHERS)
@pytest.mark.parametrize("sector_size", [512, 4096])
def test_sector_cipher_matches_openssl_per_sector(implementation, spec, key_size, sector_size):
    key = hashlib.sha512(spec.encode()).digest()[:key_size]
    cipher = SectorCipher(parse_cipher_spec(spec), key, sector_size)
    # Sector numbers around 2^32 / 8: "plain" IVs wrap at 32 bits, plain64 ones do not.
    first = (1 << 32) // (sector_size // 512) - 2
    for sectors in (1, 3, RUN_BYTES // sector_size + 5):  # the last one spans two bulk runs
        data = os.urandom(sectors * sector_size)
        buf = bytearray(data)
        cipher.encrypt(memoryview(buf), first)
        assert bytes(buf) == reference_crypt(spec, key, data, sector_size, True, first)
        cipher.decrypt(memoryview(buf), first)
        assert bytes(buf) == data


@pytest.mark.parametrize("spec,reason", [
    ("serpent-xts-plain64", "unsupported cipher 'serpent-xts-plain64'"),
    ("aes-ctr-plain64", "unsupported cipher 'aes-ctr-plain64'"),
    ("aes-xts-benbi", "unknown IV mode 'benbi'"),
    ("aes-cbc-essiv:sha1", "not an AES key size"),
])
def test_unsupported_cipher_specs_are_named(spec, reason):
    with pytest.raises(LuksError, match=reason):
        parse_cipher_spec(spec)


def test_bad_key_size_is_refused():
    with pytest.raises(LuksError, match="aes-xts-plain64: a 384-bit key is not supported"):
        SectorCipher(parse_cipher_spec("aes-xts-plain64"), bytes(48))


def test_af_merge_inverts_the_luks_split():
    # AF split as the LUKS1 spec writes it, independently: random s_0..s_{n-2}, then
    # s_{n-1} = d_{n-1} xor key with d_k = diffuse(d_{k-1} xor s_{k-1}).
    def diffuse(block: bytes) -> bytes:
        pieces = [block[i:i + 32] for i in range(0, len(block), 32)]
        return b"".join(hashlib.sha256(n.to_bytes(4, "big") + p).digest()[:len(p)] for n, p in enumerate(pieces))
    key, stripes = os.urandom(40), 7
    stripes_data = [os.urandom(40) for _ in range(stripes - 1)]
    d = bytes(40)
    for s in stripes_data:
        d = diffuse(bytes(a ^ b for a, b in zip(d, s)))
    material = b"".join(stripes_data) + bytes(a ^ b for a, b in zip(d, key))
    assert af_merge(material, 40, stripes, "sha256") == key


def test_not_luks_is_a_clear_error():
    data = bytes(1 * MiB)
    with pytest.raises(LuksError, match="not a LUKS image"):
        read_volume(lambda offset, length: data[offset:offset + length], len(data))


# cryptsetup images, checked against the volume key -------------------------------------------

CRYPTSETUP_CASES = {
    "luks1-default": ("luks1", "pbkdf2", 4 * MiB, []),
    "luks1-sha1-cbc-essiv": ("luks1", "pbkdf2", 4 * MiB,
                             ["--hash", "sha1", "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256"]),
    "luks1-sha512-xts256": ("luks1", "pbkdf2", 4 * MiB, ["--hash", "sha512", "--key-size", "256"]),
    "luks1-ripemd160-cbc-plain": ("luks1", "pbkdf2", 2 * MiB,
                                  ["--hash", "ripemd160", "--cipher", "aes-cbc-plain", "--key-size", "128"]),
    "luks1-cbc-plain64": ("luks1", "pbkdf2", 4 * MiB, ["--cipher", "aes-cbc-plain64", "--key-size", "256"]),
    "luks2-default-argon2id": ("luks2", "argon2id", 18 * MiB, []),
    "luks2-argon2i-cbc-essiv-512": ("luks2", "argon2i", 4 * MiB,
                                    ["--cipher", "aes-cbc-essiv:sha256", "--key-size", "256", "--sector-size", "512"]),
    "luks2-pbkdf2-sha512-xts256": ("luks2", "pbkdf2", 4 * MiB, ["--hash", "sha512", "--key-size", "256"]),
    "luks2-argon2id-cbc-plain64-4k": ("luks2", "argon2id", 4 * MiB,
                                      ["--cipher", "aes-cbc-plain64", "--key-size", "256", "--sector-size", "4096"]),
}
COMPACT_LUKS2 = ["--offset", "4096", "--luks2-keyslots-size", "1M", "--luks2-metadata-size", "16k"]


def make_cryptsetup_image(tmp: Path, keyfile: Path, case: str) -> Path:
    luks_type, pbkdf, size, options = CRYPTSETUP_CASES[case]
    compact = COMPACT_LUKS2 if luks_type == "luks2" and "default" not in case else []
    return cryptsetup_format(tmp / f"{case}.img", keyfile, luks_type, size, *fast_pbkdf(pbkdf), *compact, *options)


@pytest.mark.parametrize("case", list(CRYPTSETUP_CASES))
def test_cryptsetup_image_read_and_write(implementation, tmp, keyfile, case):
    image = make_cryptsetup_image(tmp, keyfile, case)
    key = dump_volume_key(image, keyfile, tmp)
    layout = dump_layout(image)
    offset, sector, spec = layout["offset"], layout["sector_size"], layout["cipher"]
    payload = os.path.getsize(image) - offset
    # Known plaintext, encrypted by the reference cipher straight into the file.
    plain = random_file(tmp / "plain", payload, seed=1).read_bytes()
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(reference_crypt(spec, key, plain, sector, True))
    chain, top = open_luks(image, ("keyfile", str(keyfile)))
    try:
        assert top.get_size() == payload
        assert top.block_size()[0] == sector
        assert read_range(top, 0, payload) == plain
        assert read_range(top, 1000, 5000) == plain[1000:6000]  # unaligned: read and trimmed to fit
        # Writes, aligned and not, land encrypted where the reference cipher expects them.
        expected = bytearray(plain)
        for where, length in [(sector * 3, sector * 2), (sector * 7 + 100, 3000), (payload - 17, 17)]:
            data = os.urandom(length)
            top.pwrite(memoryview(data), where, 0)
            expected[where:where + length] = data
        top.flush(0)
    finally:
        top.close()
    with open(image, "rb") as f:
        f.seek(offset)
        assert reference_crypt(spec, key, f.read(), sector, False) == bytes(expected)


@pytest.mark.parametrize("options", [["--sector-size", "512"], ["--sector-size", "4096"],
                                     ["--cipher", "aes-cbc-essiv:sha256", "--key-size", "256"]])
def test_luks2_encrypted_in_place_by_cryptsetup(implementation, tmp, keyfile, options):
    # cryptsetup itself encrypts known plaintext: no reference cipher of ours involved.
    image = random_file(tmp / "disk.img", 6 * MiB, seed=3)
    plain = image.read_bytes()[:4 * MiB]
    cryptsetup_encrypt_in_place(image, keyfile, *options)
    chain, top = open_luks(image, ("keyfile", str(keyfile)), readonly=True)
    try:
        assert read_range(top, 0, len(plain)) == plain
    finally:
        top.close()


# qemu-img LUKS1 images ---------------------------------------------------------------------------

QEMU_CIPHERS = {
    "xts": (),
    "cbc-essiv": ("cipher-alg=aes-256", "cipher-mode=cbc", "ivgen-alg=essiv", "ivgen-hash-alg=sha256"),
}


@pytest.fixture(scope="module")
def qemu_images(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (LUKS1 image filled by qemu, its plaintext)."""
    tmp = tmp_path_factory.mktemp("qemu-luks")
    plain = random_file(tmp / "plain.raw", 4 * MiB, seed=7)
    images = {}
    for name, options in QEMU_CIPHERS.items():
        image = qemu_luks1(tmp / f"{name}.luks", PASSPHRASE, "4M", *options)
        qemu_write_plain(image, PASSPHRASE, plain)
        images[name] = (image, plain)
    return images


@pytest.mark.parametrize("name", list(QEMU_CIPHERS))
def test_qemu_luks1_reads_what_qemu_wrote_and_qemu_reads_our_writes(tmp, qemu_images, name):
    original, plain = qemu_images[name]
    image = Path(shutil.copy(original, tmp / "copy.luks"))
    chain, top = open_luks(image, ("passphrase", PASSPHRASE))
    expected = bytearray(plain.read_bytes())
    try:
        assert top.get_size() == len(expected)
        assert read_range(top, 0, len(expected)) == expected
        for where, length in [(0, 64 * 1024), (MiB + 511, 2), (3 * MiB - 700, 5000)]:
            data = os.urandom(length)
            top.pwrite(memoryview(data), where, 0)
            expected[where:where + length] = data
    finally:
        top.close()
    qemu_read_plain(image, PASSPHRASE, tmp / "back.raw")
    assert (tmp / "back.raw").read_bytes() == expected


def test_served_to_qemu_and_in_agreement_with_nbdkit(tmp, qemu_images):
    image, plain = qemu_images["xts"]
    with serve("--filter=luks", "file", str(image), f"passphrase={PASSPHRASE}", "--readonly") as ours, \
            serve_nbdkit("--filter=luks", "file", str(image), f"passphrase={PASSPHRASE}", "--readonly") as nbdkit:
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", plain, ours.uri], timeout=60)
        nbdcopy_to_file(ours.uri, tmp / "ours.raw")
        nbdcopy_to_file(nbdkit.uri, tmp / "nbdkit.raw")
    assert sha256_file(tmp / "ours.raw") == sha256_file(tmp / "nbdkit.raw") == sha256_file(plain)


def test_nbdkit_reads_what_we_write_on_a_cryptsetup_luks1_image(tmp, keyfile):
    image = make_cryptsetup_image(tmp, keyfile, "luks1-sha512-xts256")
    plain = random_file(tmp / "plain.raw", 1 * MiB, seed=5)
    with serve("--filter=luks", "file", str(image), f"keyfile={keyfile}") as ours:
        run(["nbdcopy", plain, ours.uri], timeout=60)
    with serve_nbdkit("--filter=luks", "file", str(image), f"passphrase=+{keyfile}", "--readonly") as nbdkit:
        nbdcopy_to_file(nbdkit.uri, tmp / "nbdkit.raw")
    assert (tmp / "nbdkit.raw").read_bytes()[:MiB] == plain.read_bytes()


def test_cbc_essiv_served_to_qemu_io(qemu_images):
    # nbdkit 1.32 cannot read ESSIV images at all; qemu reads ours through NBD.
    image, plain = qemu_images["cbc-essiv"]
    with serve("--filter=luks", "file", str(image), f"passphrase={PASSPHRASE}", "--readonly") as ours:
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", plain, ours.uri], timeout=60)


# Over NBD: unaligned I/O, zero and trim ----------------------------------------------------------

def test_unaligned_write_keeps_neighbouring_bytes(tmp, keyfile):
    # nbdkit 1.32 corrupts the rest of the sector here; we read-modify-write it.
    image = make_cryptsetup_image(tmp, keyfile, "luks2-default-argon2id")
    with serve("--filter=luks", "file", str(image), f"keyfile={keyfile}") as srv:
        nbdsh(srv.uri, "\n".join([
            "h.pwrite(bytes(range(256)) * 64, 0)",  # 16 KiB of a known pattern
            "h.pwrite(b'X' * 10, 4090)",  # across the first 4096-byte sector boundary
            "h.pwrite(b'Y', 9000)",
            "expected = bytearray(bytes(range(256)) * 64)",
            "expected[4090:4100] = b'X' * 10",
            "expected[9000] = ord('Y')",
            "assert h.pread(16384, 0) == expected",
            "assert h.pread(7, 4093) == bytes(expected[4093:4100])",
            "info = h.get_block_size(nbd.SIZE_MINIMUM)",
            "assert info == 4096, info",
        ]))


def test_zero_and_trim_write_encrypted_zeroes(tmp, keyfile):
    image = make_cryptsetup_image(tmp, keyfile, "luks1-default")
    offset = dump_layout(image)["offset"]
    with serve("--filter=luks", "file", str(image), f"keyfile={keyfile}") as srv:
        nbdsh(srv.uri, "\n".join([
            "h.pwrite(b'\\xff' * 262144, 0)",
            "h.zero(65536, 4096)",
            "h.trim(512, 100000)",
            "h.zero(100, 200000)",  # unaligned: read-modify-write
            "data = h.pread(262144, 0)",
            "assert data[4096:69632] == bytes(65536)",
            "assert data[100000:100512] == bytes(512) and data[200000:200100] == bytes(100)",
            "assert data.count(0) == 65536 + 512 + 100",
            "try:",
            "    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)",
            "    raise SystemExit('fast zero should fail')",
            "except nbd.Error as e:",
            "    assert e.errnum == errno.ENOTSUP, e",
            "assert h.pread(4096, 0) == b'\\xff' * 4096",
        ]))
    with open(image, "rb") as f:
        f.seek(offset + 4096)
        raw = f.read(65536)
    assert raw.count(0) < 1024  # ciphertext of zeroes, no plaintext hole


def test_extents_report_all_data(tmp, keyfile):
    image = make_cryptsetup_image(tmp, keyfile, "luks1-default")  # the payload is a sparse hole
    chain, top = open_luks(image, ("keyfile", str(keyfile)))
    try:
        extents = Extents(0, top.get_size())
        top.extents(top.get_size(), 0, 0, extents)
        assert list(extents) == [(0, top.get_size(), EXTENT_DATA)]
        with pytest.raises(NBDError) as failed:
            top.zero(4096, 0, FLAG_FAST_ZERO)
        assert failed.value.errno == errno.ENOTSUP
    finally:
        top.close()


def test_concurrent_partial_writes_to_one_sector_all_land(tmp, keyfile):
    image = make_cryptsetup_image(tmp, keyfile, "luks2-pbkdf2-sha512-xts256")
    chain, top = open_luks(image, ("keyfile", str(keyfile)))
    sector = top.block_size()[0]

    def writer(index: int) -> None:
        for round in range(30):
            # Each thread owns bytes index*8.. of the first two sectors, plus aligned sector 2.
            top.pwrite(memoryview(bytes([index + 1]) * 8), index * 8 + round % 2 * sector, 0)
            top.pwrite(memoryview(bytes([index]) * sector), 2 * sector, 0)

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so an unlocked read-modify-write would race
    try:
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        data = read_range(top, 0, 2 * sector)
        for index in range(8):
            assert data[index * 8:index * 8 + 8] == bytes([index + 1]) * 8
            assert data[sector + index * 8:sector + index * 8 + 8] == bytes([index + 1]) * 8
    finally:
        sys.setswitchinterval(switch_interval)
        top.close()


# Keys, keyslots and passphrase sources ---------------------------------------------------------

def test_several_keyslots_and_keyslot_parameter(tmp, keyfile):
    image = make_cryptsetup_image(tmp, keyfile, "luks2-argon2i-cbc-essiv-512")
    second = tmp / "second-key"
    second.write_bytes(b"another passphrase")
    add_key(image, keyfile, second, "--key-slot", "3")
    first_data = None
    for params in [[("keyfile", str(keyfile))], [("keyfile", str(second))],
                   [("keyfile", str(second)), ("keyslot", "3")], [("passphrase", "another passphrase")]]:
        chain, top = open_luks(image, *params, readonly=True)
        data = read_range(top, 0, 65536)
        top.close()
        assert first_data is None or data == first_data
        first_data = data
    with pytest.raises(ConfigError, match=r"no keyslot matches the passphrase \(tried keyslot 0\)"):
        open_luks(image, ("keyfile", str(second)), ("keyslot", "0"))
    with pytest.raises(ConfigError, match=r"keyslot 5 is not active \(active keyslots: 0, 3\)"):
        open_luks(image, ("keyfile", str(keyfile)), ("keyslot", "5"))


def test_passphrase_from_file_and_fd(tmp, qemu_images):
    image, plain = qemu_images["xts"]
    (tmp / "pass").write_text(PASSPHRASE + "\n")  # nbdkit's +FILE drops one trailing newline
    read_fd, write_fd = os.pipe()
    os.write(write_fd, PASSPHRASE.encode())
    os.close(write_fd)
    expected = plain.read_bytes()[:8192]
    for source in [f"+{tmp / 'pass'}", f"-{read_fd}"]:
        chain, top = open_luks(image, ("passphrase", source), readonly=True)
        assert read_range(top, 0, 8192) == expected
        top.close()


def test_key_derivation_happens_once_at_start_up(tmp, keyfile, monkeypatch):
    image = make_cryptsetup_image(tmp, keyfile, "luks2-argon2id-cbc-plain64-4k")
    chain, first = open_luks(image, ("keyfile", str(keyfile)))

    def no_more_derivation(*args, **kwargs):
        raise AssertionError("the key was derived again for a connection")

    monkeypatch.setattr(luks_filter, "unlock", no_more_derivation)
    for _ in range(3):
        layer = chain.open(readonly=False, export_name="")
        assert read_range(layer, 0, 4096) == read_range(first, 0, 4096)
        layer.close()
    first.close()


def test_wrong_passphrase_fails_at_start_up_and_writes_nothing(tmp, qemu_images):
    image = Path(shutil.copy(qemu_images["xts"][0], tmp / "copy.luks"))
    before = sha256_file(image)
    wrong = "not the right one"
    proc = run([*NBDFORMATS, "-f", "-U", tmp / "sock", "--filter=luks", "file", image, f"passphrase={wrong}"],
               timeout=60, check=False)
    stderr = proc.stderr.decode()
    assert proc.returncode != 0
    assert "no keyslot matches" in stderr
    assert wrong not in stderr and wrong not in proc.stdout.decode()
    assert not (tmp / "sock").exists()
    assert sha256_file(image) == before
    helped = run([*NBDFORMATS, "--filter=luks", "file", "--help"], timeout=60)
    assert b"passphrase=" in helped.stdout and b"keyfile=" in helped.stdout


# Damaged and unsupported images ----------------------------------------------------------------

def test_luks2_damaged_primary_header_falls_back_to_secondary(tmp, keyfile, caplog):
    image = make_cryptsetup_image(tmp, keyfile, "luks2-pbkdf2-sha512-xts256")
    chain, top = open_luks(image, ("keyfile", str(keyfile)))
    expected = read_range(top, 0, 65536)
    top.close()
    with open(image, "r+b") as f:
        f.seek(4096 + 10)  # inside the primary JSON area: its checksum no longer matches
        f.write(b"#")
    chain, top = open_luks(image, ("keyfile", str(keyfile)))
    assert read_range(top, 0, 65536) == expected
    top.close()
    assert "primary LUKS2 header is damaged (bad sha256 checksum in the header at offset 0)" in caplog.text
    assert "using the secondary header at offset 16384" in caplog.text
    with open(image, "r+b") as f:
        f.seek(16384 + 4096 + 10)
        f.write(b"#")
    with pytest.raises(ConfigError, match="no valid LUKS2 header .*bad sha256 checksum in the header at offset 16384"):
        open_luks(image, ("keyfile", str(keyfile)))


def test_truncated_files(tmp, keyfile):
    image = make_cryptsetup_image(tmp, keyfile, "luks1-default")
    payload_offset = dump_layout(image)["offset"]
    os.truncate(image, payload_offset - 4096)
    with pytest.raises(ConfigError, match=f"truncated: the encrypted data starts at {payload_offset}"):
        open_luks(image, ("keyfile", str(keyfile)))
    os.truncate(image, 100 * 1024)  # inside the keyslot material
    with pytest.raises(ConfigError, match="truncated: keyslot 0 ends at"):
        open_luks(image, ("keyfile", str(keyfile)))
    os.truncate(image, 300)
    with pytest.raises(ConfigError, match="truncated: the LUKS1 header needs 592 bytes"):
        open_luks(image, ("keyfile", str(keyfile)))


def test_unsupported_ciphers_and_features(tmp, keyfile):
    luks1 = make_cryptsetup_image(tmp, keyfile, "luks1-default")
    with open(luks1, "r+b") as f:
        f.seek(8)
        f.write(b"serpent\0")  # cipher_name
    with pytest.raises(ConfigError, match="luks: unsupported cipher 'serpent-xts-plain64'"):
        open_luks(luks1, ("keyfile", str(keyfile)))
    luks2 = make_cryptsetup_image(tmp, keyfile, "luks2-pbkdf2-sha512-xts256")

    def twofish(metadata):
        metadata["segments"]["0"]["encryption"] = "twofish-xts-plain64"
    rewrite_luks2_json(luks2, twofish)
    with pytest.raises(ConfigError, match="luks: unsupported cipher 'twofish-xts-plain64'"):
        open_luks(luks2, ("keyfile", str(keyfile)))

    def reencrypting(metadata):
        metadata["segments"]["0"]["encryption"] = "aes-xts-plain64"
        metadata["config"]["requirements"] = {"mandatory": ["online-reencrypt-v2"]}
    rewrite_luks2_json(luks2, reencrypting)
    with pytest.raises(ConfigError, match="requirements not supported: online-reencrypt-v2"):
        open_luks(luks2, ("keyfile", str(keyfile)))


def test_passphrase_and_keyfile_are_exclusive(tmp, keyfile):
    image = make_cryptsetup_image(tmp, keyfile, "luks1-default")
    with pytest.raises(ConfigError, match="exactly one of passphrase= or keyfile="):
        open_luks(image)
    with pytest.raises(ConfigError, match="exactly one of passphrase= or keyfile="):
        open_luks(image, ("keyfile", str(keyfile)), ("passphrase", "x"))


def test_absurd_key_derivation_costs_are_refused(tmp, keyfile):
    image = make_cryptsetup_image(tmp, keyfile, "luks2-pbkdf2-sha512-xts256")

    def huge_argon2(metadata):
        metadata["keyslots"]["0"]["kdf"] = {"type": "argon2id", "time": 4, "memory": 1 << 40, "cpus": 1,
                                           "salt": metadata["keyslots"]["0"]["kdf"]["salt"]}
    rewrite_luks2_json(image, huge_argon2)
    with pytest.raises(ConfigError, match=r"no usable keyslot \(keyslot 0 skipped: argon2id costs are out of range"):
        open_luks(image, ("keyfile", str(keyfile)))


def flip(data: bytearray, start: int, end: int, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(start, end)] = rng.randrange(256)


def test_damaged_headers_only_ever_give_clear_errors(tmp, keyfile):
    """Random byte changes in LUKS1 headers and LUKS2 metadata (with valid checksums): parsing
    either succeeds or raises LuksError, never anything else."""
    rng = random.Random(6)
    luks1 = make_cryptsetup_image(tmp, keyfile, "luks1-default").read_bytes()
    luks2 = make_cryptsetup_image(tmp, keyfile, "luks2-pbkdf2-sha512-xts256").read_bytes()
    json_end = luks2.index(b"\0", 4096)
    outcomes = {"parsed": 0, "refused": 0}
    for round in range(400):
        if round % 2:
            data = bytearray(luks1[:2 * MiB])
            flip(data, 0, 592, rng)
        else:
            data = bytearray(luks2[:2 * MiB])
            header_size = 16384
            for offset in (0, header_size) if round % 4 else (0,):
                flip(data, offset + 4096, offset + json_end, rng)
                data[offset + 448:offset + 512] = bytes(64)
                data[offset + 448:offset + 480] = hashlib.sha256(data[offset:offset + header_size]).digest()
        try:
            volume = read_volume(lambda offset, length: bytes(data[offset:offset + length]), len(data))
            keyslot_order(volume, None)
            outcomes["parsed"] += 1
        except LuksError:
            outcomes["refused"] += 1
    assert outcomes["parsed"] and outcomes["refused"], outcomes


# Hostile key derivation costs and metadata (issue 20, items 2, 4 and 5) -----------------------------

LUKS1_KEYSLOT0_ITERATIONS = 208 + 4  # after the 208-byte phdr: active (4), iterations (4)
LUKS1_MK_DIGEST_ITER = 164


def set_u32(image: Path, offset: int, value: int) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(value.to_bytes(4, "big"))


def test_key_derivation_over_the_time_limit_is_not_run(tmp, keyfile):
    """8 hours of PBKDF2 (2^31-1 iterations) or an Argon2 time cost of 2^32-1: refused at once,
    naming the keyslot, its cost and the parameter that raises the limit."""
    image = make_cryptsetup_image(tmp, keyfile, "luks1-default")
    set_u32(image, LUKS1_KEYSLOT0_ITERATIONS, 0x7FFFFFFF)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"over the 60 s key derivation limit: keyslot 0 \(pbkdf2-sha256, "
                                          r"2147483647 iterations\) would take about \d+ s.*luks-kdf-max-seconds="):
        open_luks(image, ("keyfile", str(keyfile)))
    assert time.monotonic() - started < 10
    with pytest.raises(ConfigError, match=r"over the 0.5 s key derivation limit"):
        open_luks(image, ("keyfile", str(keyfile)), ("luks-kdf-max-seconds", "0.5"))

    luks2 = make_cryptsetup_image(tmp, keyfile, "luks2-argon2i-cbc-essiv-512")

    def endless_argon2(metadata):
        metadata["keyslots"]["0"]["kdf"]["time"] = 0xFFFFFFFF
    rewrite_luks2_json(luks2, endless_argon2)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"keyslot 0 \(argon2i, 4294967295 passes, 32768 KiB, 1 lanes\) would take"):
        open_luks(luks2, ("keyfile", str(keyfile)))
    assert time.monotonic() - started < 10


def test_cost_estimates_count_cpu_time_not_a_stalled_wall_clock(monkeypatch):
    """The estimate of a keyslot's derivation time comes from a 20 ms benchmark.  Timed by the wall
    clock, one preemption on a loaded machine (nbdkit's test-luks-info.sh, four tests at once) made
    qemu-img's 2 s keyslot (8,264,312 PBKDF2-SHA256 iterations, 64-byte key) look like 444 s, over
    the 60 s limit.  Here the wall clock jumps a second at every reading: the estimate must not
    move, as it counts this thread's CPU time."""
    from nbdformats.formats.luks import kdf
    real = time.perf_counter
    jumps = iter(range(1, 1_000_000))
    monkeypatch.setattr(kdf.time, "perf_counter", lambda: real() + next(jumps))
    kdf._pbkdf2_seconds_per_block.cache_clear()
    kdf._argon2_seconds_per_kib_pass.cache_clear()
    try:
        assert kdf.Pbkdf2("sha256", 8_264_312, b"salt").estimated_seconds(64) < 60
        assert kdf.Argon2("argon2id", 4, 1 << 20, 4, b"salt" * 4).estimated_seconds(32) < 60  # cryptsetup's 1 GiB, 4 passes
    finally:
        kdf._pbkdf2_seconds_per_block.cache_clear()
        kdf._argon2_seconds_per_kib_pass.cache_clear()


def test_iteration_counts_openssl_cannot_run_are_refused_clearly(tmp, keyfile):
    """2^31 and more (LUKS1 fields are 32 bits) used to end in an OverflowError traceback."""
    image = make_cryptsetup_image(tmp, keyfile, "luks1-default")
    set_u32(image, LUKS1_KEYSLOT0_ITERATIONS, 0xFFFFFFFF)
    with pytest.raises(ConfigError, match=r"keyslot 0 skipped: PBKDF2 iteration count 4294967295 is invalid "
                                          r"\(1 to 2\^31-1"):
        open_luks(image, ("keyfile", str(keyfile)))
    image = make_cryptsetup_image(tmp, keyfile, "luks1-default")
    set_u32(image, LUKS1_MK_DIGEST_ITER, 1 << 31)
    with pytest.raises(ConfigError, match=r"no usable keyslot .*PBKDF2 iteration count 2147483648 is invalid"):
        open_luks(image, ("keyfile", str(keyfile)))


def test_ctrl_c_stops_a_long_key_derivation_and_a_terminal_shows_its_progress(tmp, keyfile):
    """SIGINT during 2^31-1 PBKDF2 iterations (allowed by the parameter): the server exits at once,
    without a traceback; before, Python ran no handler until OpenSSL's call returned."""
    image = make_cryptsetup_image(tmp, keyfile, "luks1-default")
    set_u32(image, LUKS1_KEYSLOT0_ITERATIONS, 0x7FFFFFFF)
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a terminal's size
    proc = subprocess.Popen([*NBDFORMATS, "-f", "-U", tmp / "sock", "--filter=luks", "file", image,
                             f"keyfile={keyfile}", "luks-kdf-max-seconds=100000"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    try:
        shown = b""
        deadline = time.monotonic() + 30
        while b"key derivation of keyslot 0" not in shown and time.monotonic() < deadline:
            if select.select([controller], [], [], 0.5)[0]:
                shown += os.read(controller, 65536)
        assert b"luks: key derivation of keyslot 0 (pbkdf2-sha256, 2147483647 iterations)" in shown, shown
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        while proc.poll() is None and time.monotonic() - interrupted < 10:  # the terminal keeps being read
            if select.select([controller], [], [], 0.1)[0]:
                try:
                    shown += os.read(controller, 65536)
                except OSError:  # the terminal closed with the process
                    break
        assert proc.wait(timeout=10) != 0
        assert time.monotonic() - interrupted < 5
        while select.select([controller], [], [], 0.2)[0]:
            try:
                shown += os.read(controller, 65536)
            except OSError:  # the terminal closed with the process
                break
        assert b"Traceback" not in shown, shown
    finally:
        proc.kill()
        proc.wait(timeout=10)
        os.close(controller)


def luks2_header_copy(json_area: bytes, header_size: int, offset: int, magic: bytes) -> bytes:
    """One LUKS2 header copy built from the specification's layout, its sha256 checksum set."""
    binary = bytearray(4096)
    binary[0:6] = magic
    struct.pack_into(">HQQ", binary, 6, 2, header_size, 1)
    binary[72:72 + 6] = b"sha256"
    struct.pack_into(">Q", binary, 256, offset)
    area = bytearray(binary + json_area.ljust(header_size - 4096, b"\0"))
    area[448:480] = hashlib.sha256(area).digest()
    return bytes(area)


def test_deeply_nested_luks2_json_is_a_clear_error(tmp, keyfile):
    """A 4 MiB JSON area of `[` with valid checksums: RecursionError before."""
    size = 4 * MiB
    json_area = b"[" * (size - 4096 - 1)
    data = (luks2_header_copy(json_area, size, 0, b"LUKS\xba\xbe") +
            luks2_header_copy(json_area, size, size, b"SKUL\xba\xbe") + bytes(MiB))
    with pytest.raises(LuksError, match="LUKS2 metadata nests 4190207 levels deep"):
        read_volume(lambda offset, length: data[offset:offset + length], len(data))
    image = tmp / "nested.luks"
    image.write_bytes(data)
    proc = run([*NBDFORMATS, "-f", "-U", tmp / "sock", "--filter=luks", "file", image, f"keyfile={keyfile}"],
               timeout=60, check=False)
    assert proc.returncode == 1 and b"nests 4190207 levels deep" in proc.stderr and b"Traceback" not in proc.stderr


@pytest.mark.parametrize("field,value,message", [
    ("offset", "9" * 5000, r"segments.0.offset has 5000 digits"),
    ("offset", str(1 << 64), r"segments.0.offset is 18446744073709551616, more than 2\^64-1"),
    ("offset", str(1 << 63), r"segments.0.offset is 9223372036854775808, more than 2\^63-1"),
    ("size", str((1 << 64) - 512), r"segments.0.size is 18446744073709551104, more than 2\^63-1"),
])
def test_luks2_sizes_beyond_what_a_disk_can_hold_are_named(tmp, keyfile, field, value, message):
    image = make_cryptsetup_image(tmp, keyfile, "luks2-pbkdf2-sha512-xts256")

    def huge(metadata):
        metadata["segments"]["0"][field] = value
    rewrite_luks2_json(image, huge)
    with pytest.raises(ConfigError, match=message):
        open_luks(image, ("keyfile", str(keyfile)))
