"""How linuxdisk should merge several dir=: measure the candidates on two generated trees.

    .venv/bin/python benchmarks/linuxdisk_merge.py [WORKDIR] [--files N] [--file-kib K]

Candidates (each ends with an ext4 image holding A merged with B, B winning):
  link+mke2fs    staging tree of hard links (what linuxdisk does), then mke2fs -d staging
  copy+mke2fs    staging tree of copies (linuxdisk's fallback when the link is refused)
  mke2fs+debugfs mke2fs -d A, then debugfs -w adds/replaces B's files (write only: a lower bound,
                 as modes, owners, times, symlinks and hard links would still need commands)
and the baseline mke2fs -d A alone.  /dev/shm (another filesystem) forces the copies.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time

from nbdformats.plugins.linuxdisk import estimate_size, tree


def make_tree(root: str, files: int, file_kib: int, seed: int) -> None:
    block = os.urandom(file_kib * 1024)
    for i in range(files):
        directory = os.path.join(root, f"d{i % 50:02d}")
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"f{i}"), "wb") as f:
            f.write(block[seed:] + block[:seed])  # distinct content per tree


def mke2fs(source: str, image: str, size: int) -> None:
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", source, image], check=True, timeout=600)


def timed(label: str, results: dict, fn) -> None:
    start = time.perf_counter()
    fn()
    results[label] = time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", nargs="?", default="/var/tmp")
    parser.add_argument("--files", type=int, default=4000)
    parser.add_argument("--file-kib", type=int, default=32)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="linuxdisk-bench-", dir=args.workdir)
    try:
        a, b = os.path.join(work, "a"), os.path.join(work, "b")
        make_tree(a, args.files, args.file_kib, 1)
        make_tree(b, args.files // 2, args.file_kib, 2)  # half of B's names replace A's
        size = estimate_size(tree.scan(a), "ext4") * 2
        image = os.path.join(work, "img")
        subprocess.run(["sync"], check=True)
        results: dict[str, float] = {}
        timed("mke2fs A alone", results, lambda: mke2fs(a, image, size))

        staging = os.path.join(work, "staging")
        os.mkdir(staging)
        timed("link staging", results, lambda: tree.stage([a, b], staging))
        timed("link: mke2fs", results, lambda: mke2fs(staging, image, size))
        shutil.rmtree(staging)

        copy_root = tempfile.mkdtemp(prefix="linuxdisk-bench-", dir="/dev/shm")
        try:
            timed("copy staging (/dev/shm)", results, lambda: tree.stage([a, b], copy_root))
            timed("copy: mke2fs", results, lambda: mke2fs(copy_root, image, size))
        finally:
            shutil.rmtree(copy_root)

        def debugfs_merge() -> None:
            mke2fs(a, image, size)
            commands = []
            for directory in sorted(os.listdir(b)):
                commands.append(f"cd /{directory}")
                for name in sorted(os.listdir(os.path.join(b, directory))):
                    commands += [f"rm {name}", f"write {os.path.join(b, directory, name)} {name}"]
            script = os.path.join(work, "cmds")
            with open(script, "w") as f:
                f.write("\n".join(commands) + "\n")
            subprocess.run(["debugfs", "-w", "-f", script, image], check=True, capture_output=True, timeout=600)

        timed("mke2fs A + debugfs B", results, debugfs_merge)
        total = args.files * args.file_kib // 1024 + args.files // 2 * args.file_kib // 1024
        print(f"A: {args.files} files, B: {args.files // 2} files of {args.file_kib} KiB ({total} MiB in all)")
        for label, seconds in results.items():
            print(f"  {label:28s} {seconds:7.3f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
