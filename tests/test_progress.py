"""Progress where people look: rich bars on a terminal, plain lines on stderr elsewhere (logs,
pipes, nohup) at most every $ELVIS_PROGRESS_INTERVAL seconds, nothing with --quiet."""

import contextlib
import io
import re
import time
from types import SimpleNamespace

import pytest

from elvis_cli import TaskProgress
from elvis_cli.cli.app import _Progress
from tests.conftest import SMALL
from tests.helpers import cli_in, one_line_error, write_views

LINE = re.compile(r"^elvis: extracting (\d+)/8: (.*)$")


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> SimpleNamespace:
    """`elvis extract` of 8 images in this process (stdout and stderr are not terminals), with
    a line for every update, then with --quiet."""
    cwd = tmp_path_factory.mktemp("progress")
    write_views(cwd / "imgs")
    every = {"ELVIS_PROGRESS_INTERVAL": "0"}
    shown = cli_in("extract", "imgs", "-o", "shown.h5", *SMALL, cwd=cwd, env=every)
    quiet = cli_in("extract", "imgs", "-o", "quiet.h5", *SMALL, "--quiet", cwd=cwd, env=every)
    for result in (shown, quiet):
        assert result.returncode == 0, result.stderr
    return SimpleNamespace(cwd=cwd, shown=shown, quiet=quiet)


def test_outside_a_terminal_each_update_is_a_plain_line_on_stderr(extracted):
    lines = extracted.shown.stderr.splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [int(match[1]) for match in matches] == list(range(9))
    for match in matches[1:-1]:
        assert re.fullmatch(r"[\d.]+ img/s, \d+s elapsed, ETA \d+s", match[2]), match[0]
    assert re.fullmatch(r"[\d.]+ img/s, \d+s elapsed, done", matches[-1][2])
    assert "\x1b" not in extracted.shown.stderr


def test_stdout_keeps_only_the_results(extracted):
    assert len(extracted.shown.stdout.strip().splitlines()) == 1
    assert "images extracted" in extracted.shown.stdout and "/s" not in extracted.shown.stdout


def test_quiet_shows_no_progress(extracted):
    assert extracted.quiet.stderr == ""


def test_a_bad_interval_is_one_error_line(tmp_path):
    result = cli_in("extract", "imgs", "-o", "x.h5", cwd=tmp_path,
                    env={"ELVIS_PROGRESS_INTERVAL": "soon"})
    one_line_error(result, "ELVIS_PROGRESS_INTERVAL must be a number of seconds", "'soon'")


EVENTS = [TaskProgress("evaluating", 0, 2, "demo: features"),
          *(TaskProgress("extracting", done, 3, "demo: query") for done in range(4)),
          TaskProgress("evaluating", 1, 2, "demo: elvis"),
          *(TaskProgress("re-ranking", done, 5, "demo: elvis, shortlist 10") for done in range(6)),
          TaskProgress("preparing", 1, 0, "step"),  # of unknown total: never finished
          TaskProgress("evaluating", 2, 2, "finished")]


def displayed(monkeypatch, interval: str, terminal: bool = False) -> tuple[str, str]:
    """stdout and stderr of the CLI's display of EVENTS."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return terminal

    monkeypatch.setenv("ELVIS_PROGRESS_INTERVAL", interval)
    out, err = Terminal(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _Progress() as show:
        for event in EVENTS:
            show(event)
    return out.getvalue(), err.getvalue()


def heads(text: str) -> list[str]:
    """Each line's task and count."""
    return [line.split(":")[1].split(" (")[0].strip() for line in text.splitlines()]


def test_interval_zero_shows_every_update(monkeypatch):
    _, err = displayed(monkeypatch, "0")
    lines = err.splitlines()
    assert len(lines) == len(EVENTS)
    assert re.fullmatch(r"elvis: re-ranking 1/5 \(demo: elvis, shortlist 10\): [\d.]+ "
                        r"queries/s, \d+s elapsed, ETA \d+s", lines[7]), lines[7]
    assert re.fullmatch(r"elvis: evaluating 1/2 \(demo: elvis\): \d+s elapsed, ETA \d+s",
                        lines[5]), lines[5]  # stages have no unit, so no rate
    assert re.fullmatch(r"elvis: preparing 1 \(step\): \d+s elapsed", lines[-2]), lines[-2]


def test_a_long_interval_shows_nothing_of_short_tasks(monkeypatch):
    """A command that ends or fails at once says only its results or its error."""
    assert displayed(monkeypatch, "3600") == ("", "")


def test_lines_come_once_per_interval_and_when_a_long_task_finishes(monkeypatch):
    clock = iter([0.0,  # the display starts
                  0.0, 4.0, 11.0, 12.0, 13.0,  # "long" 0..4 of 4: lines at 11 s and its end
                  14.0, 15.0])  # "short" 0..1 of 1, ended within the interval: no line
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    monkeypatch.setenv("ELVIS_PROGRESS_INTERVAL", "10")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), _Progress() as show:
        for done in range(5):
            show(TaskProgress("long", done, 4))
        for done in range(2):
            show(TaskProgress("short", done, 1))
    assert heads(err.getvalue()) == ["long 2/4", "long 4/4"]


def test_on_a_terminal_bars_are_drawn_and_no_lines_written(monkeypatch):
    out, err = displayed(monkeypatch, "0", terminal=True)
    assert err == ""
    assert "demo: elvis, shortlist 10" in out and "queries/s" in out
