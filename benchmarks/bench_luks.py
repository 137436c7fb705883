"""Throughput of the luks filter: `nbdformats --filter=luks` vs `nbdkit --filter=luks`, same image, same run.

    .venv/bin/python benchmarks/bench_luks.py [--size-mib 256] [--rounds 3]

A LUKS1 image (cryptsetup, aes-xts-plain64 with a 512-bit key: the default of cryptsetup and
qemu) with a payload of random bytes is served by both servers over Unix sockets; nbdcopy reads
the whole disk (to null:) and then writes a random file over it.  The servers take turns round
by round so load from other processes falls on both alike; medians of the rounds are printed
with nbdformats/nbdkit ratios, and the raw results saved under benchmarks/results/
(benchmarks/tables.py makes the docs tables from them).  Both read the same bytes (checked by
sha256).  nbdkit 1.32 reads LUKS1 only, so LUKS2 (4096-byte sectors) and aes-cbc-essiv are
timed for nbdformats alone.  The in-process cipher speed (no sockets, 16 MiB runs) shows what
the decryption itself costs, with each implementation: OpenSSL per sector (the C extension)
and numpy with AES-ECB runs (the fallback).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import NBDFORMATS, ROOT, MiB, Server, nbdcopy_sha256, sh, timed
from _results import Run

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


def bench_servers(names: list[str], image: Path, tmp: Path, rounds: int,
                  source: Path) -> dict[str, dict[str, list[float]]]:
    """Read (whole disk) and write (the source file) MB/s of each server, every round."""
    servers = {name: start_server(name, image, tmp) for name in names}
    try:
        sums = {name: nbdcopy_sha256(server.uri) for name, server in servers.items()}
        if len(set(sums.values())) != 1:
            raise SystemExit(f"servers disagree on the plaintext: {sums}")
        disk_mb = int(sh("nbdinfo", "--size", next(iter(servers.values())).uri)) / 1e6
        source_mb = os.path.getsize(source) / 1e6
        runs: dict[str, dict[str, list[float]]] = {name: {"read": [], "write": []} for name in names}
        for _ in range(rounds):
            for name, server in servers.items():
                runs[name]["read"].append(disk_mb / timed("nbdcopy", server.uri, "null:"))
                runs[name]["write"].append(source_mb / timed("nbdcopy", source, server.uri))
        return runs
    finally:
        for server in servers.values():
            server.stop()


def bench_cipher(spec: str, key_size: int, sector_size: int, native: bool) -> tuple[float, float] | None:
    """Median decrypt and encrypt MB/s of 5 passes over 16 MiB in process; None when `native`
    (the C extension) is asked for and not built."""
    cipher = SectorCipher(parse_cipher_spec(spec), os.urandom(key_size), sector_size)
    if native and cipher._native is None:
        return None
    if not native:
        cipher._native = None  # the numpy fallback
    buf = memoryview(bytearray(os.urandom(16 * MiB)))
    decrypt, encrypt = [], []
    for _ in range(5):
        start = time.perf_counter()
        cipher.decrypt(buf, 0)
        decrypt.append(len(buf) / 1e6 / (time.perf_counter() - start))
        start = time.perf_counter()
        cipher.encrypt(buf, 0)
        encrypt.append(len(buf) / 1e6 / (time.perf_counter() - start))
    return statistics.median(decrypt), statistics.median(encrypt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="payload size")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    run = Run("luks", {"size_mib": args.size_mib, "rounds": args.rounds})
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
    servers: dict[str, dict[str, dict[str, float]]] = {}
    raw: dict[str, dict[str, dict[str, list[float]]]] = {}
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
        print(f"{'image':44} {'server':11} {'read MB/s':>10} {'write MB/s':>11}  (medians of {args.rounds} rounds)")
        for title, luks_type, names, options in cases:
            image = tmp / f"{luks_type}-{len(options)}.img"
            make_image(image, luks_type, HEADER_ROOM + payload, *options)
            raw[title] = bench_servers(names, image, tmp, args.rounds, source)
            servers[title] = {name: {kind: statistics.median(values) for kind, values in raw[title][name].items()}
                              for name in names}
            for name in names:
                m = servers[title][name]
                ratio = ""
                if name != "nbdkit" and "nbdkit" in servers[title]:
                    theirs = servers[title]["nbdkit"]
                    ratio = f"  ({m['read'] / theirs['read']:.2f}x / {m['write'] / theirs['write']:.2f}x nbdkit)"
                print(f"{title:44} {name:11} {m['read']:10.0f} {m['write']:11.0f}{ratio}", flush=True)
            image.unlink()
    print()
    print(f"{'in-process cipher (16 MiB runs, medians)':44} {'implementation':18} {'decrypt MB/s':>12} {'encrypt MB/s':>12}")
    cipher: dict[str, dict[str, dict[str, float]]] = {}
    for spec, key_size, sector_size in [("aes-xts-plain64", 64, 512), ("aes-xts-plain64", 64, 4096),
                                        ("aes-cbc-essiv:sha256", 32, 512), ("aes-cbc-essiv:sha256", 32, 4096)]:
        case = f"{spec}, {sector_size}-byte sectors"
        cipher[case] = {}
        for implementation, native in (("OpenSSL per sector", True), ("numpy + AES-ECB", False)):
            speeds = bench_cipher(spec, key_size, sector_size, native)
            if speeds is None:
                print(f"{case:44} {implementation:18} (the C extension is not built)")
                continue
            cipher[case][implementation] = {"decrypt": speeds[0], "encrypt": speeds[1]}
            print(f"{case:44} {implementation:18} {speeds[0]:12.0f} {speeds[1]:12.0f}", flush=True)
    run.save({"servers_mb_per_s": servers, "rounds": raw, "cipher_mb_per_s": cipher})


if __name__ == "__main__":
    main()
