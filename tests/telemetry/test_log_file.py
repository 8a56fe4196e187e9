"""BufferedLineFile: buffered, whole-line appends that survive forks, exits and full disks."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from meshware.exceptions import ConfigurationError
from meshware.telemetry.log_file import BufferedLineFile

ROOT = Path(__file__).resolve().parents[2]


def wait_for(path: Path, lines: int, timeout: float = 10.0) -> list[str]:
    """The file's lines once it has ``lines`` of them (or what it has after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        found = path.read_text().splitlines() if path.exists() else []
        if len(found) >= lines or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def test_lines_are_buffered_until_flushed_in_order(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = BufferedLineFile(path, flush_interval=3600)
    for n in range(5):
        log.write(f"line {n}")
    assert path.read_text() == ""  # nothing written yet: no system call per line
    log.flush()
    assert path.read_text() == "".join(f"line {n}\n" for n in range(5))
    log.close()


def test_the_interval_flushes_without_a_call(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = BufferedLineFile(path, flush_interval=0.05)
    log.write("first")
    assert wait_for(path, 1) == ["first"]
    log.write("second")
    assert wait_for(path, 2) == ["first", "second"]
    log.close()


def test_a_full_buffer_is_written_at_once(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = BufferedLineFile(path, flush_interval=3600, buffer_bytes=16)
    log.write("short")
    assert path.read_text() == ""
    log.write("x" * 20)  # 6 + 21 bytes buffered: over 16
    assert path.read_text() == "short\n" + "x" * 20 + "\n"
    log.close()


def test_appends_to_an_existing_file_and_close_drops_later_lines(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_text("kept\n")
    log = BufferedLineFile(path)
    log.write("new")
    log.close()
    log.write("after close")
    log.flush()
    assert path.read_text() == "kept\nnew\n"


def test_text_that_is_not_utf8_is_escaped_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = BufferedLineFile(path)
    log.write("lone surrogate \udc80 here")
    log.close()
    assert path.read_bytes() == b"lone surrogate \\udc80 here\n"


def test_a_failing_file_is_reported_once_and_never_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    log = BufferedLineFile("/dev/full", flush_interval=3600)
    with caplog.at_level(logging.WARNING, logger="meshware.telemetry"):
        for _ in range(3):
            log.write("lost")
            log.flush()
    log.close()
    warnings = [r for r in caplog.records if "could not write to the log file" in r.message]
    assert len(warnings) == 1
    assert "/dev/full" in warnings[0].getMessage()


@pytest.mark.parametrize(
    ("kwargs", "field", "expected"),
    [
        ({"flush_interval": 0}, "flush_interval", "above 0"),
        ({"flush_interval": -1.0}, "flush_interval", "above 0"),
        ({"flush_interval": 7200}, "flush_interval", "at most 3600"),
        ({"flush_interval": "1"}, "flush_interval", "number"),
        ({"flush_interval": True}, "flush_interval", "number"),
        ({"buffer_bytes": 0}, "buffer_bytes", "positive"),
        ({"buffer_bytes": 1.5}, "buffer_bytes", "positive"),
    ],
)
def test_bad_settings_name_the_field(
    tmp_path: Path, kwargs: dict[str, object], field: str, expected: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        BufferedLineFile(tmp_path / "a.log", **kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field
    assert expected in str(caught.value)


@pytest.mark.parametrize("path", ["", 42, None, "a\x00b"])
def test_a_path_that_is_not_one_is_refused(path: object) -> None:
    with pytest.raises(ConfigurationError) as caught:
        BufferedLineFile(path)  # type: ignore[arg-type]
    assert caught.value.field == "path"


def test_an_unopenable_path_says_why(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "access.log"
    with pytest.raises(ConfigurationError) as caught:
        BufferedLineFile(missing)
    assert caught.value.field == "path"
    assert caught.value.value == str(missing)
    assert "No such file or directory" in str(caught.value)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_repeat_the_parents_buffer(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = BufferedLineFile(path, flush_interval=3600)
    log.write("parent before fork")
    with warnings.catch_warnings():
        # Python 3.12+ warns about forking a process with threads (the flusher); the child
        # here only writes and flushes.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: its own buffer, its own flusher
        try:
            log.write("child")
            log.flush()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    log.write("parent after fork")
    log.close()
    assert sorted(path.read_text().splitlines()) == [
        "child",
        "parent after fork",
        "parent before fork",
    ]


def test_lines_buffered_at_exit_are_written(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    code = (
        "from meshware.telemetry.log_file import BufferedLineFile\n"
        f"log = BufferedLineFile({str(path)!r}, flush_interval=3600)\n"
        "log.write('written at exit')\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    assert path.read_text() == "written at exit\n"


def test_processes_sharing_a_file_never_split_a_line(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    code = (
        "import sys\n"
        "from meshware.telemetry.log_file import BufferedLineFile\n"
        f"log = BufferedLineFile({str(path)!r}, buffer_bytes=4096)\n"
        "for n in range(3000):\n"
        '    log.write(\'{"writer":%s,"n":%d,"pad":"%s"}\' % (sys.argv[1], n, \'x\' * 150))\n'
    )
    writers = [subprocess.Popen([sys.executable, "-c", code, str(w)], cwd=ROOT) for w in range(3)]
    for writer in writers:
        assert writer.wait(timeout=60) == 0
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for line in path.read_text().splitlines():
        entry = json.loads(line)  # a torn line would not parse
        seen[entry["writer"]].append(entry["n"])
    for numbers in seen.values():
        assert numbers == list(range(3000))  # complete, and in each writer's order
