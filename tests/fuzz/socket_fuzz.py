#!/usr/bin/env python3
"""Socket-level fuzzer: hostile clients against a running nbdformats server.

Several threads open connection after connection and send mutated handshakes and requests
(wrong magic, huge lengths, truncated packets, option floods, block status with absurd
lengths, writes past the end, extended headers with 64-bit lengths, reads whose replies
are never read).  Meanwhile a well-behaved libnbd client writes and reads back its own
region and must always get the right bytes, a greedy client pipelines large reads it never
reads, and the server's RSS is sampled.  The run fails if the server dies, logs a traceback,
grows past the memory bound, or the good client sees a wrong answer or an error.

Standalone (a long run; starts its own server on a Unix socket):

    .venv/bin/python tests/fuzz/socket_fuzz.py --duration 3600 --plugin memory
    .venv/bin/python tests/fuzz/socket_fuzz.py --duration 600 --plugin file --seed 7

Only Unix sockets are used: nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from nbdformats.protocol import wire as P  # noqa: E402

DISK_SIZE = 16 << 20
GOOD_REGION = (8 << 20, 12 << 20)  # only the good client may write here (policy filter)
EXPORTS = [b"", b"disk", b"x" * 5000, b"\xff\xfe", b"a/b"]


@dataclass
class Stats:
    connections: int = 0
    bytes_sent: int = 0
    good_checks: int = 0
    peak_rss_mib: float = 0.0
    base_rss_mib: float = 0.0
    rss_timeline: list[float] = field(default_factory=list)  # peak RSS of each tenth of the run
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, message: str) -> None:
        with self.lock:
            if len(self.failures) < 20:
                self.failures.append(message)


# -- Building blocks -------------------------------------------------------------------------
def option(code: int, payload: bytes = b"", length: int | None = None) -> bytes:
    return P.OPTION_HEADER.pack(P.IHAVEOPT, code, len(payload) if length is None else length) + payload


def go_payload(name: bytes, requests: list[int] = ()) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(requests)) + \
        b"".join(struct.pack(">H", r) for r in requests)


def meta_payload(name: bytes, queries: list[bytes]) -> bytes:
    return struct.pack(">II", len(name), len(queries)) + name + b"".join(
        struct.pack(">I", len(q)) + q for q in queries)


def mutate(rng: random.Random, data: bytes) -> bytes:
    raw = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not raw:
            break
        kind = rng.random()
        pos = rng.randrange(len(raw))
        if kind < 0.5:
            raw[pos] = rng.randrange(256)
        elif kind < 0.7:
            del raw[pos:pos + rng.randint(1, 8)]
        elif kind < 0.85:
            raw[pos:pos] = rng.randbytes(rng.randint(1, 16))
        else:
            raw[pos:pos + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"])
    return bytes(raw)


def request(magic: int, flags: int, type: int, cookie: int, offset: int, length: int, extended: bool) -> bytes:
    if extended:
        return P.EXTENDED_REQUEST.pack(magic, flags, type, cookie, offset & ((1 << 64) - 1), length)
    return P.REQUEST.pack(magic, flags, type, cookie, offset & ((1 << 64) - 1), length & 0xFFFFFFFF)


def random_requests(rng: random.Random, extended: bool, count: int) -> bytes:
    magic = P.EXTENDED_REQUEST_MAGIC if extended else P.REQUEST_MAGIC
    out = bytearray()
    for cookie in range(count):
        type = rng.choice([P.CMD_READ, P.CMD_READ, P.CMD_WRITE, P.CMD_FLUSH, P.CMD_TRIM, P.CMD_CACHE,
                           P.CMD_WRITE_ZEROES, P.CMD_BLOCK_STATUS, P.CMD_RESIZE, 9, 200])
        flags = rng.choice([0, 0, P.CMD_FLAG_FUA, P.CMD_FLAG_DF, P.CMD_FLAG_REQ_ONE, P.CMD_FLAG_PAYLOAD_LEN,
                            rng.randrange(1 << 16)])
        offset = rng.choice([0, rng.randrange(DISK_SIZE), DISK_SIZE - 1, DISK_SIZE, DISK_SIZE + 4096,
                             1 << 63, (1 << 64) - 512])
        length = rng.choice([0, 1, 512, 4096, rng.randrange(1 << 20), 32 << 20, (64 << 20) + 1, 0xFFFFFFFF,
                             *([1 << 40, (1 << 64) - 1] if extended else [])])
        has_payload = type == P.CMD_WRITE or (extended and flags & P.CMD_FLAG_PAYLOAD_LEN)
        header = request(magic, flags, type, cookie, offset, length, extended)
        if has_payload:
            sent = min(length, rng.choice([length, 4096, 0]), 1 << 20)
            out += header + rng.randbytes(sent)
            if sent < length:
                return bytes(out)  # a truncated payload: the stream ends here
        else:
            out += header
        if rng.random() < 0.05:
            out = bytearray(mutate(rng, bytes(out)))
    return bytes(out)


class Client:
    def __init__(self, path: str, stats: Stats, timeout: float = 2.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.stats = stats

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            with self.stats.lock:
                self.stats.bytes_sent += len(data)
            return True
        except OSError:  # the server may rightly have closed on us
            return False

    def recv_some(self, limit: int = 1 << 20) -> bytes:
        try:
            return self.sock.recv(limit)
        except OSError:
            return b""

    def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        self.sock.settimeout(0.1)
        while time.monotonic() < end:
            try:
                if not self.sock.recv(1 << 20):
                    return
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return

    def recv_exact(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = self.recv_some(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def close(self) -> None:
        try:
            if random.random() < 0.5:  # abrupt: RST instead of FIN where the kernel does that
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()


def negotiate(client: Client, rng: random.Random) -> tuple[bool, bool] | None:
    """A valid fixed-newstyle handshake, sometimes with structured replies or extended headers.
    Returns (structured, extended) or None if the server closed."""
    if client.recv_exact(18) is None:
        return None
    client.send(struct.pack(">I", 3))
    extended = rng.random() < 0.3
    structured = extended or rng.random() < 0.5
    out = b""
    if extended:
        out += option(P.OPT_EXTENDED_HEADERS)
    elif structured:
        out += option(P.OPT_STRUCTURED_REPLY)
    if structured:
        out += option(P.OPT_SET_META_CONTEXT, meta_payload(b"", [b"base:allocation"]))
    out += option(P.OPT_GO, go_payload(rng.choice(EXPORTS[:2]), [P.INFO_BLOCK_SIZE]))
    client.send(out)
    # read option replies until the ACK of GO
    while True:
        head = client.recv_exact(P.OPTION_REPLY.size)
        if head is None:
            return None
        _, opt, rtype, length = P.OPTION_REPLY.unpack(head)
        if length and client.recv_exact(length) is None:
            return None
        if opt == P.OPT_GO and (rtype == P.REP_ACK or rtype & (1 << 31)):
            return (structured, extended) if rtype == P.REP_ACK else None


# -- Scenarios -------------------------------------------------------------------------------
def scenario_garbage_handshake(c: Client, rng: random.Random) -> None:
    c.recv_exact(18)
    c.send(rng.choice([rng.randbytes(rng.randint(1, 300)), struct.pack(">I", rng.randrange(1 << 32)),
                       b"\0\0\0\3" + rng.randbytes(rng.randint(1, 64))]))
    c.drain(0.2)


def scenario_mutated_options(c: Client, rng: random.Random) -> None:
    c.recv_exact(18)
    opts = [option(P.OPT_LIST), option(P.OPT_STRUCTURED_REPLY), option(P.OPT_EXTENDED_HEADERS),
            option(P.OPT_INFO, go_payload(rng.choice(EXPORTS), [0, 1, 2, 3, 0xFFFF])),
            option(P.OPT_LIST_META_CONTEXT, meta_payload(b"", [b"base:", b"qemu:dirty-bitmap:x"])),
            option(P.OPT_SET_META_CONTEXT, meta_payload(b"", [b"base:allocation"] * 3)),
            option(P.OPT_STARTTLS), option(rng.randrange(1 << 32), rng.randbytes(rng.randint(0, 40))),
            option(P.OPT_GO, go_payload(rng.choice(EXPORTS))),
            option(P.OPT_EXPORT_NAME, rng.choice(EXPORTS))]
    stream = b"\0\0\0" + bytes([rng.choice([1, 3])]) + b"".join(rng.choice(opts) for _ in range(rng.randint(1, 12)))
    if rng.random() < 0.7:
        stream = mutate(rng, stream)
    c.send(stream)
    c.drain(0.3)


def scenario_huge_option(c: Client, rng: random.Random) -> None:
    c.recv_exact(18)
    code = rng.choice([P.OPT_GO, P.OPT_LIST, P.OPT_EXPORT_NAME, 77])
    c.send(b"\0\0\0\3" + option(code, rng.randbytes(rng.randint(0, 4096)), length=rng.choice([0xFFFFFFFF, 1 << 20])))
    c.drain(0.2)


def scenario_option_flood(c: Client, rng: random.Random) -> None:
    c.recv_exact(18)
    c.send(b"\0\0\0\3" + option(rng.choice([P.OPT_LIST, 99, P.OPT_STRUCTURED_REPLY])) * rng.randint(1000, 5000))
    c.drain(0.5)


def scenario_requests(c: Client, rng: random.Random) -> None:
    mode = negotiate(c, rng)
    if mode is None:
        return
    _, extended = mode
    c.send(random_requests(rng, extended, rng.randint(1, 60)))
    c.drain(rng.choice([0.0, 0.1, 0.5]))


def scenario_unread_replies(c: Client, rng: random.Random) -> None:
    mode = negotiate(c, rng)
    if mode is None:
        return
    _, extended = mode
    magic = P.EXTENDED_REQUEST_MAGIC if extended else P.REQUEST_MAGIC
    c.sock.settimeout(1.0)
    for cookie in range(rng.randint(10, 200)):
        if not c.send(request(magic, P.CMD_FLAG_DF if mode[0] else 0, P.CMD_READ, cookie,
                              rng.randrange(DISK_SIZE - (4 << 20)), 4 << 20, extended)):
            break
    time.sleep(rng.uniform(0.2, 1.5))  # the replies are never read


SCENARIOS = [(scenario_garbage_handshake, 2), (scenario_mutated_options, 4), (scenario_huge_option, 1),
             (scenario_option_flood, 1), (scenario_requests, 6), (scenario_unread_replies, 1)]


def fuzz_worker(path: str, stats: Stats, seed: int, deadline: float) -> None:
    rng = random.Random(seed)
    funcs, weights = zip(*SCENARIOS)
    while time.monotonic() < deadline:
        scenario = rng.choices(funcs, weights)[0]
        try:
            client = Client(path, stats)
        except OSError as e:
            stats.fail(f"cannot connect: {e}")
            time.sleep(0.5)
            continue
        with stats.lock:
            stats.connections += 1
        try:
            scenario(client, rng)
        except (OSError, struct.error):
            pass
        finally:
            client.close()


def greedy_worker(path: str, stats: Stats, deadline: float) -> None:
    """Holds one connection that pipelines big reads and never reads a reply."""
    rng = random.Random(1)
    while time.monotonic() < deadline:
        try:
            client = Client(path, stats, timeout=0.5)
        except OSError:
            time.sleep(0.5)
            continue
        try:
            if negotiate(client, rng) is not None:
                cookie = 0
                while time.monotonic() < deadline and cookie < 10_000:
                    if not client.send(request(P.REQUEST_MAGIC, 0, P.CMD_READ, cookie, 0, 16 << 20, False)):
                        time.sleep(0.2)  # the server stopped reading: that is the point
                    cookie += 1
        except OSError:
            pass
        finally:
            client.close()


def good_worker(uri: str, stats: Stats, seed: int, deadline: float) -> None:
    """A libnbd client that must always get correct answers."""
    try:
        import nbd
    except ImportError:
        stats.fail("the libnbd Python binding (python3-libnbd) is needed for the good client")
        return
    rng = random.Random(seed)
    start, end = GOOD_REGION
    model = bytearray(end - start)
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        while time.monotonic() < deadline:
            length = rng.choice([512, 4096, 4096, 65536])
            offset = rng.randrange(0, end - start - length)
            data = rng.randbytes(length)
            h.pwrite(data, start + offset, nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0)
            model[offset:offset + length] = data
            check = rng.randrange(0, end - start - 65536)
            if h.pread(65536, start + check) != model[check:check + 65536]:
                stats.fail(f"good client read wrong data at {start + check}")
                return
            if rng.random() < 0.1:
                h.flush()
            with stats.lock:
                stats.good_checks += 1
        if h.pread(end - start, start) != model:
            stats.fail("good client's region differs at the end")
    except nbd.Error as e:
        stats.fail(f"good client got an error: {e}")
    finally:
        h.shutdown()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def start_server(plugin: str, workdir: str, extra: list[str]) -> tuple[subprocess.Popen, str, str]:
    sock = os.path.join(workdir, "sock")
    log = os.path.join(workdir, "server.log")
    rules = os.path.join(workdir, "policy.rules")
    with open(rules, "w") as f:  # fuzzers never touch the good client's region
        f.write(f"allow writes export=good\ndeny writes range={GOOD_REGION[0]}-{GOOD_REGION[1]}\n"
                "deny resize\n")
    if plugin == "memory":
        args = ["memory", f"size={DISK_SIZE}"]
    else:
        disk = os.path.join(workdir, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(DISK_SIZE)
        args = ["file", disk]
    cmd = [sys.executable, "-m", "nbdformats", "-f", *extra, "-U", sock, "--filter=policy", *args,
           f"policy={rules}"]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, cwd=ROOT)
    for _ in range(500):
        if os.path.exists(sock):
            break
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}: {Path(log).read_text()}")
        time.sleep(0.02)
    time.sleep(0.2)
    return proc, sock, log


def run(duration: float, plugin: str, seed: int, workers: int = 4, rss_bound_mib: float = 400.0,
        extra: list[str] | None = None) -> Stats:
    stats = Stats()
    with tempfile.TemporaryDirectory(prefix="nbdf-fuzz-") as workdir:
        proc, sock, log = start_server(plugin, workdir, extra or [])
        try:
            stats.base_rss_mib = stats.peak_rss_mib = rss_mib(proc.pid)
            deadline = time.monotonic() + duration
            threads = [threading.Thread(target=fuzz_worker, args=(sock, stats, seed * 100 + i, deadline), daemon=True)
                       for i in range(workers)]
            threads.append(threading.Thread(target=greedy_worker, args=(sock, stats, deadline), daemon=True))
            threads.append(threading.Thread(target=good_worker, daemon=True,
                                            args=(f"nbd+unix:///good?socket={sock}", stats, seed, deadline)))
            for t in threads:
                t.start()
            started = time.monotonic()
            stats.rss_timeline = [0.0] * 10
            while time.monotonic() < deadline:
                time.sleep(0.25)
                if proc.poll() is not None:
                    stats.fail(f"the server died with status {proc.returncode}")
                    break
                rss = rss_mib(proc.pid)
                tenth = min(9, int((time.monotonic() - started) * 10 / duration))
                stats.rss_timeline[tenth] = max(stats.rss_timeline[tenth], rss)
                stats.peak_rss_mib = max(stats.peak_rss_mib, rss)
            for t in threads:
                t.join(30)
                if t.is_alive():
                    stats.fail(f"{t.name} did not finish: the server stopped answering?")
            if proc.poll() is None and stats.good_checks == 0:
                stats.fail("the good client made no progress")
            if stats.peak_rss_mib - stats.base_rss_mib > rss_bound_mib:
                stats.fail(f"server RSS grew from {stats.base_rss_mib:.0f} to {stats.peak_rss_mib:.0f} MiB")
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    stats.fail("the server did not stop on SIGTERM")
        text = Path(log).read_text(errors="replace")
        if "Traceback" in text:
            start = text.index("Traceback")
            stats.fail("the server logged a traceback:\n" + text[max(0, start - 300):start + 3000])
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--plugin", choices=["memory", "file"], default="memory")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rss-bound", type=float, default=400.0, help="allowed RSS growth in MiB")
    args = parser.parse_args()
    print(f"fuzzing {args.plugin} for {args.duration:.0f} s, seed {args.seed}", flush=True)
    stats = run(args.duration, args.plugin, args.seed, args.workers, args.rss_bound)
    print(f"{stats.connections} connections, {stats.bytes_sent / 1e6:.1f} MB sent, {stats.good_checks} good "
          f"checks, RSS {stats.base_rss_mib:.0f} -> peak {stats.peak_rss_mib:.0f} MiB")
    print("peak RSS in each tenth of the run (MiB):", " ".join(f"{r:.0f}" for r in stats.rss_timeline))
    for failure in stats.failures:
        print("FAIL:", failure)
    return 1 if stats.failures else 0


if __name__ == "__main__":
    sys.exit(main())
