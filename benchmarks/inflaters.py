"""In-process: the gzip index pass and a sequential read behind the index, with each inflate
DeflateIndex can use (zlib-ng's, through python-zlib-ng, and the system zlib's).  Run by
bench_compress.py under the virtualenv's Python; prints one JSON object of medians (seconds).

    .venv/bin/python benchmarks/inflaters.py FILE.gz ROUNDS
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from nbdformats.formats import deflate_index
from nbdformats.formats.deflate_index import DeflateIndex

CHUNK = 1 << 20


def measure(path: str) -> tuple[float, float]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size

        def reader(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        started = time.perf_counter()
        index = DeflateIndex(reader, 0, size, raw=False)
        total = index.build()
        built = time.perf_counter() - started
        buf = memoryview(bytearray(CHUNK))
        started = time.perf_counter()
        for offset in range(0, total, CHUNK):
            index.read_into(buf[:min(CHUNK, total - offset)], offset)
        read = time.perf_counter() - started
        index.close()
        return built, read
    finally:
        os.close(fd)


def main() -> None:
    path, rounds = sys.argv[1], int(sys.argv[2])
    inflaters = {"zlib-ng": deflate_index.ZLIB_NG, "zlib": deflate_index.SYSTEM_ZLIB}
    samples: dict[str, dict[str, list[float]]] = {name: {"index_s": [], "read_s": []} for name in inflaters}
    for _ in range(rounds):
        for name, inflater in inflaters.items():
            if inflater is None:
                continue
            deflate_index.INFLATER = inflater
            built, read = measure(path)
            samples[name]["index_s"].append(built)
            samples[name]["read_s"].append(read)
    print(json.dumps({name: {key: statistics.median(values) for key, values in s.items() if values} | {"rounds": s}
                      for name, s in samples.items()}))


if __name__ == "__main__":
    main()
