"""Start-up: `--help` and argument errors answer before torch is imported (it alone takes
over a second to import here; benchmarks/startup.py measures the commands' times)."""

import subprocess
import sys
from pathlib import Path

import pytest

from elvis_cli.model.registry import RERANKERS
from tests.helpers import write_views

HEAVY = ("torch", "pandas", "faiss", "numba", "matplotlib", "transformers")
DEMO_ROOT = str(Path(__file__).resolve().parent.parent / "examples" / "data")  # holds `demo`

# `elvis` argument lists, each answered with an error (or help) before any work
ANSWERED_EARLY = [
    ["--help"],
    ["search", "--help"],
    ["rerank", "--features", "nope.h5"],
    ["rerank", "--queries", "g.h5", "--gallery", "nope.h5"],
    ["rerank", "--features", "g.h5", "-o", "out.txt"],
    ["rerank", "--features", "g.h5", "--precision", "fast"],
    ["rerank", "--features", "g.h5", "--lam", "2"],
    ["shortlist", "--features", "nope.h5"],
    ["extract", "no_such_folder", "-o", "x.h5"],
    ["export", "nope.h5", "--out-dir", "o", "--name", "n", "--split", "query"],
    ["search", "imgs/cat_0.jpg", "--gallery", "nope.h5"],
    ["search", "imgs/cat_0.jpg", "--gallery", "g.h5", "-o", "out.txt"],
    ["search", "imgs/dog_*.jpg", "--gallery", "g.h5"],
    ["search", "imgs/cat_0.jpg", "--gallery", "g.h5", "--temp", "0"],
    ["datasets", "prepare", "nope"],
    ["evaluate", "--dataset", "nope", "--data-root", "."],
    ["evaluate", "--dataset", "demo", "--dataset", "nope", "--data-root", DEMO_ROOT],
    ["evaluate", "--all-datasets", "--data-root", "no_such_root"],
    ["evaluate", "--dataset", "demo", "--model", "elvs"],
    ["evaluate", "--dataset", "demo", "--shortlist", "-1"],
    ["evaluate", "--dataset", "demo", "--lam", "2"],
    ["evaluate", "--dataset", "demo", "--temp", "0"],
    ["evaluate", "--dataset", "demo", "--grid-shortlist", "0"],
    ["evaluate", "--dataset", "demo", "--grid-lam", "2"],
    ["evaluate", "--dataset", "demo", "--grid-temp", "0"],
    ["train", "no_such_folder", "-o", "x.pt"],
    ["train", "imgs", "-o", "x.txt"],
    ["train", "imgs", "-o", "g.h5/x.pt"],  # in a file, not a folder: unwritable
    ["train", "imgs", "-o", "x.pt", "--labels", "nope.csv"],
    ["train", "imgs", "-o", "x.pt", "--labels", "labels.csv"],
    ["train", "imgs", "-o", "x.pt", "--val", "no_such_folder"],
    ["train", "imgs/cat_0.jpg", "-o", "x.pt"],  # too few photos to split off a validation set
    ["extract", "imgs", "-o", "x.h5", "--backbone", "dinov9"],
    ["evaluate", "--dataset", "demo", "--data-root", DEMO_ROOT, "--backbone", "dinov9"],
    ["train", "imgs", "-o", "x.pt", "--backbone", "dinov9"],
    ["evaluate", "--dataset", "demo", "--data-root", DEMO_ROOT, "--out-dir", "g.h5/results"],
    # a folder holding other files is never replaced by a results page
    ["evaluate", "--dataset", "demo", "--data-root", DEMO_ROOT, "--out-dir", "busy", "--report"],
]

PROBE = """
import sys
from elvis_cli.cli.app import main
for args in {cases!r}:
    sys.argv = ["elvis", *args]
    try:
        main()
    except SystemExit as ended:
        print(args[0], ended.code, file=sys.stderr)
print(sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.subprocess
def test_argument_errors_import_no_heavy_library(tmp_path):
    write_views(tmp_path / "imgs")
    (tmp_path / "g.h5").write_bytes(b"not checked before the other options")
    (tmp_path / "labels.csv").write_text("path,instance_id\nimgs/cat_0.jpg\n")  # no id
    (tmp_path / "busy" / "report" / "demo").mkdir(parents=True)
    (tmp_path / "busy" / "report" / "demo" / "notes.txt").write_text("mine")
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(cases=ANSWERED_EARLY, heavy=HEAVY)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    codes = [line.split()[-1] for line in result.stderr.splitlines()
             if not line.startswith("elvis")]
    assert codes == ["0", "0", *["1"] * (len(ANSWERED_EARLY) - 2)], result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.splitlines()[-1] == "[]", result.stdout


def test_each_reranker_name_is_its_class_name():
    """The registry names re-rankers without importing their classes (torch modules), so that
    `--model` is checked early; each name must still load the class that bears it."""
    assert "elvs" not in RERANKERS
    assert [RERANKERS[name].name for name in RERANKERS] == ["global", "elvis", "ames", "chamfer",
                                                             "sv"]
