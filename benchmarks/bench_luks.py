"""Throughput of the luks filter: `nbdformats --filter=luks` vs `nbdkit --filter=luks`, same image, same run.

    .venv/bin/python benchmarks/bench_luks.py [--size-mib 256] [--rounds 3]

A LUKS1 image (cryptsetup, aes-xts-plain64 with a 512-bit key: the default of cryptsetup and
qemu) with a payload of random bytes is served by both servers over Unix sockets; nbdcopy reads
the whole disk (to null:) and then writes a random file over it.  The servers take turns round
by round so load from other processes falls on both alike; the best round counts.  Both read
the same bytes (checked by sha256).  nbdkit 1.32 reads LUKS1 only, so LUKS2 (4096-byte sectors)
and aes-cbc-essiv are timed for nbdformats alone, and the in-process cipher speed (no sockets)
shows what the decryption itself costs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import NBDFORMATS, ROOT, MiB, Server, nbdcopy_sha256, sh, timed

sys.path.insert(0, str(ROOT))

from nbdformats.formats.luks.cipher import SectorCipher, parse_cipher_spec  # noqa: E402

PASSPHRASE = "benchmark passphrase"
HEADER_ROOM = 4 * MiB  # more than any header here: the disk is at least as large as the source
SERVERS = {"nbdkit": ["nbdkit"], "nbdformats": NBDFORMATS}


def make_image(path: Path, luks_type: str, size: int, *options: str) -> None:
    keyfile = path.with_suffix(".key")
    keyfile.write_text(PASSPHRASE)
    with open(path, "wb") as f:
        f.truncate(size)
    pbkdf = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
    sh("cryptsetup", "luksFormat", "--batch-mode", "--key-file", keyfile, "--type", luks_type, *pbkdf, *options,
       path)
    dump = sh("cryptsetup", "luksDump", path).decode()
    offset = (int(dump.split("Payload offset:")[1].split()[0]) * 512 if luks_type == "luks1"
              else int(dump.split("Data segments:")[1].split("offset:")[1].split()[0]))
    # Random ciphertext decrypts to random plaintext: no need to encrypt anything.
    with open(path, "r+b") as f:
        f.seek(offset)
        for _ in range((size - offset) // MiB):
            f.write(os.urandom(MiB))


def start_server(name: str, image: Path, tmp: Path) -> Server:
    sock = tmp / f"{name}-{image.stem}.sock"
    server = Server([*SERVERS[name], "-f", "-U", sock, "--filter=luks", "file", image,
                     f"passphrase={PASSPHRASE}"], sock)
    server.wait_for_socket()
    return server


def bench_servers(names: list[str], image: Path, tmp: Path, rounds: int, source: Path) -> dict[str, dict[str, float]]:
    """Best read (whole disk) and write (the source file) MB/s of each server."""
    servers = {name: start_server(name, image, tmp) for name in names}
    try:
        sums = {name: nbdcopy_sha256(server.uri) for name, server in servers.items()}
        if len(set(sums.values())) != 1:
            raise SystemExit(f"servers disagree on the plaintext: {sums}")
        disk_mb = int(sh("nbdinfo", "--size", next(iter(servers.values())).uri)) / 1e6
        source_mb = os.path.getsize(source) / 1e6
        best: dict[str, dict[str, float]] = {name: {"read": 0.0, "write": 0.0} for name in names}
        for _ in range(rounds):
            for name, server in servers.items():
                read = disk_mb / timed("nbdcopy", server.uri, "null:")
                write = source_mb / timed("nbdcopy", source, server.uri)
                best[name]["read"] = max(best[name]["read"], read)
                best[name]["write"] = max(best[name]["write"], write)
        return best
    finally:
        for server in servers.values():
            server.stop()


def bench_cipher(spec: str, key_size: int, sector_size: int) -> tuple[float, float]:
    cipher = SectorCipher(parse_cipher_spec(spec), os.urandom(key_size), sector_size)
    buf = memoryview(bytearray(os.urandom(16 * MiB)))
    best_dec = best_enc = 0.0
    for _ in range(3):
        start = time.perf_counter()
        cipher.decrypt(buf, 0)
        best_dec = max(best_dec, len(buf) / 1e6 / (time.perf_counter() - start))
        start = time.perf_counter()
        cipher.encrypt(buf, 0)
        best_enc = max(best_enc, len(buf) / 1e6 / (time.perf_counter() - start))
    return best_dec, best_enc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="payload size")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-luks-") as tmp_name:
        tmp = Path(tmp_name)
        payload = args.size_mib * MiB
        source = tmp / "source.raw"
        with open(source, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
        cases = [
            ("LUKS1 aes-xts-plain64 512-bit", "luks1", ["nbdkit", "nbdformats"], []),
            ("LUKS1 aes-cbc-essiv:sha256", "luks1", ["nbdformats"], ["--cipher", "aes-cbc-essiv:sha256",
                                                                     "--key-size", "256"]),
            ("LUKS2 aes-xts-plain64, 4096-byte sectors", "luks2", ["nbdformats"],
             ["--offset", "4096", "--luks2-keyslots-size", "1M", "--luks2-metadata-size", "16k"]),
        ]
        print(f"{'image':44} {'server':11} {'read MB/s':>10} {'write MB/s':>11}")
        for title, luks_type, names, options in cases:
            image = tmp / f"{luks_type}-{len(options)}.img"
            make_image(image, luks_type, HEADER_ROOM + payload, *options)
            results = bench_servers(names, image, tmp, args.rounds, source)
            for name in names:
                print(f"{title:44} {name:11} {results[name]['read']:10.0f} {results[name]['write']:11.0f}")
            image.unlink()
        print()
        print(f"{'in-process cipher (16 MiB runs)':44} {'':11} {'decrypt':>10} {'encrypt':>11}")
        for spec, key_size, sector_size in [("aes-xts-plain64", 64, 512), ("aes-xts-plain64", 64, 4096),
                                            ("aes-cbc-essiv:sha256", 32, 512)]:
            dec, enc = bench_cipher(spec, key_size, sector_size)
            print(f"{spec + f' {sector_size}-byte sectors':44} {'':11} {dec:10.0f} {enc:11.0f}")


if __name__ == "__main__":
    main()
