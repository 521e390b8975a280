"""Start-up: `--help` and argument errors answer before torch is imported (it alone takes
over a second to import here; benchmarks/startup.py measures the commands' times)."""

import subprocess
import sys

import pytest

from tests.helpers import write_views

HEAVY = ("torch", "pandas", "faiss", "numba", "matplotlib", "transformers")

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
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(cases=ANSWERED_EARLY, heavy=HEAVY)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    codes = [line.split()[-1] for line in result.stderr.splitlines()
             if not line.startswith("elvis")]
    assert codes == ["0", "0", *["1"] * (len(ANSWERED_EARLY) - 2)], result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.splitlines()[-1] == "[]", result.stdout
