"""A results page's folder: its page files' names, and whether a report may replace it. Apart
from the page's code, so that `elvis evaluate --report` refuses a bad folder before importing
pandas."""

from __future__ import annotations

from pathlib import Path

from elvis_cli.util.atomic import check_writable_place
from elvis_cli.util.errors import InputError

GENERATOR = "elvis report"  # the page's <meta name="generator">: marks a folder as a report


def page_name(number: int) -> str:
    """The file of page `number` (from 1): the first is index.html."""
    return "index.html" if number == 1 else f"page-{number}.html"


def checked_report_folder(output_dir: str | Path) -> Path:
    """`output_dir` as a Path, refused now (before any work) where a report cannot replace it:
    a file, a folder holding anything but an earlier report (never deleted by a mistyped
    name), or a place where no folder can be created."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise InputError(f"report folder {path} is a file; name a folder")
    if path.is_dir() and any(path.iterdir()) and GENERATOR not in _first_page(path):
        raise InputError(f"{path} is not empty and holds no earlier report: name a new folder "
                         "(a report replaces only an earlier one)")
    check_writable_place(path)
    return path


def _first_page(folder: Path) -> str:
    try:
        with open(folder / page_name(1), encoding="utf-8", errors="replace") as page:
            return page.read(4096)
    except OSError:
        return ""
