"""nbdkit 1.32.5's own tests, run unmodified against nbdformats (harness.py): each test listed in
expected-pass.txt is one pytest test and must pass.  A test listed with `needs NAME,...` runs once
this build has those plugins and filters (nbdkit's tests probe for filters with the null plugin).

The tests run four at a time, as nbdkit's `make check -j` runs them: they mostly wait (their
start_nbdkit polls for the pid file once a second), and each uses files and sockets of its own.
The longest start first, so that the last ones to finish are short."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import harness
from conftest import SUMMARY
from nbdformats.registry import names

LISTS = {name: harness.read_list(harness.HERE / f"{name}.txt")
         for name in ("expected-pass", "known-failures", "out-of-scope")}
EXPECTED = LISTS["expected-pass"]
WORKERS = 4
# The longest tests (dozens of server starts or a timed transfer each), started first.
LONGEST = ["test-data-format.sh", "test-data-bad.sh", "test-luks-copy.sh", "test-readahead-copy.sh",
           "test-luks-info.sh", "test-partition1.sh", "test-luks-copy-zero.sh", "test-fua.sh",
           "test-data-optimum.sh", "test-nozero.sh", "test-nbd-extents.sh", "test-file-dir.sh", "test-eflags.sh"]


def missing_components(annotation: str) -> list[str]:
    have = set(names("plugin")) | set(names("filter"))
    needed = annotation.removeprefix("needs").strip()
    return [name for name in needed.split(",") if name and name.lower() not in have]


@pytest.fixture(scope="session")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, harness.Result]:
    """Every expected test this build can run, run once in a tree of nbdkit's source whose `nbdkit`
    is nbdformats; the report goes to the end of pytest's output."""
    src, data = harness.prepared()
    work = tmp_path_factory.mktemp("nbdkit-suite")
    tree, logs = work / "tree", work / "logs"
    harness.make_tree(src, data, tree, harness.nbdformats_command())
    logs.mkdir()
    runnable = sorted((test for test in EXPECTED if not missing_components(EXPECTED[test])),
                      key=lambda test: (LONGEST.index(test) if test in LONGEST else len(LONGEST), test))
    with ThreadPoolExecutor(WORKERS) as pool:
        done = dict(zip(runnable, pool.map(lambda test: harness.run_test_retrying(tree, test, logs), runnable)))
    SUMMARY[f"nbdkit {harness.VERSION}'s tests against nbdformats"] = [
        f"{test:45} {result.outcome:8} {result.seconds:5.0f} s" for test, result in done.items()]
    return done


# The first of these runs them all (the session fixture): minutes, not the suite's 300 s per test.
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("test", sorted(EXPECTED))
def test_nbdkit_test_passes(test: str, results: dict[str, harness.Result]) -> None:
    missing = missing_components(EXPECTED[test])
    if missing:
        pytest.skip(f"uses {', '.join(missing)}, not in this build yet")
    result = results[test]
    assert result.outcome == "PASS", f"{test}: {result.outcome} after {result.seconds:.0f} s\n{result.tail()}"


def test_lists_name_real_tests_once() -> None:
    """expected-pass, known-failures and out-of-scope name tests of nbdkit's TESTS, each once,
    and give the reason for every known failure and every test out of scope."""
    src, _ = harness.prepared()
    makefile = (src / "tests" / "Makefile.am").read_text().replace("\\\n", " ")
    tests = {word for line in makefile.splitlines() if "TESTS" in line.split("=")[0] and "=" in line
             for word in line.split("=", 1)[1].split() if word.endswith(".sh")}
    seen: dict[str, str] = {}
    for list_name, entries in LISTS.items():
        for test, reason in entries.items():
            assert test in tests, f"{list_name}.txt: {test} is not one of nbdkit's tests"
            assert test not in seen, f"{test} is in both {seen[test]}.txt and {list_name}.txt"
            seen[test] = list_name
            if list_name != "expected-pass":
                assert reason, f"{list_name}.txt: {test} needs a reason"
            else:
                assert not reason or reason.startswith("needs "), f"expected-pass.txt: {test}: {reason!r}"
