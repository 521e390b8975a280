"""Start-up of the `elvis` command: seconds until `--help`, an argument error or a one-photo
search is answered, each a fresh process as a user starts it, the median of several runs.

The search is of one demo photo against the demo gallery (its 171 `g*.jpg` views, extracted
here once into WORK/gallery.h5), with numba's cache and the checkpoint already warm: one run
that is not timed comes first, and the first run ever in a checkout also compiles numba's
kernel (its time is printed apart). Beside it, the two commands a search replaces: extracting
the photo, then re-ranking it against the gallery.

    PYTHONPATH=$PWD python benchmarks/startup.py                    # ~2 min
    PYTHONPATH=$PWD python benchmarks/startup.py --runs 3 --code ../main --work /tmp/before

`--code DIR` times another checkout's code (its `elvis_cli`), e.g. the code before a change;
commands it does not have are shown as `-`.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples" / "data" / "demo" / "jpg"
PHOTO = DEMO / "q01.jpg"

# (label, elvis arguments, expected exit status); WORK is the work folder
CASES = [
    ("elvis --help", ["--help"], 0),
    ("elvis rerank --help", ["rerank", "--help"], 0),
    ("elvis search --help", ["search", "--help"], 0),
    ("rerank: missing features file", ["rerank", "--features", "WORK/nope.h5"], 1),
    ("rerank: bad --precision", ["rerank", "--features", "WORK/gallery.h5", "--precision",
                                 "fast"], 1),
    ("rerank: output not .csv/.parquet", ["rerank", "--features", "WORK/gallery.h5", "-o",
                                          "WORK/out.txt"], 1),
    ("shortlist: missing features file", ["shortlist", "--features", "WORK/nope.h5"], 1),
    ("extract: missing image folder", ["extract", "WORK/no_photos", "-o", "WORK/x.h5"], 1),
    ("export: missing features file", ["export", "WORK/nope.h5", "--out-dir", "WORK/o",
                                       "--name", "n", "--split", "query"], 1),
    ("evaluate: unknown dataset", ["evaluate", "--dataset", "nope", "--data-root", "WORK"], 1),
    ("evaluate: unknown --model", ["evaluate", "--dataset", "demo", "--model", "elvs"], 1),
    ("train: missing photo folder", ["train", "WORK/no_photos", "-o", "WORK/x.pt"], 1),
    ("train: output not .pt", ["train", str(DEMO), "-o", "WORK/x.txt"], 1),
    ("search: missing gallery", ["search", str(PHOTO), "--gallery", "WORK/nope.h5"], 1),
    ("search: one photo, demo gallery", ["search", str(PHOTO), "--gallery", "WORK/gallery.h5",
                                         "--quiet"], 0),
    ("search: the same, --embedding-cache", ["search", str(PHOTO), "--gallery",
                                             "WORK/gallery.h5", "--embedding-cache",
                                             "WORK/embeddings", "--quiet"], 0),
]
# what a search replaces: two commands, timed together
TWO_COMMANDS = [["extract", str(PHOTO), "-o", "WORK/query.h5", "--quiet"],
                ["rerank", "--queries", "WORK/query.h5", "--gallery", "WORK/gallery.h5",
                 "-o", "WORK/reranked.csv"]]


def elvis(args: list[str], code: Path, work: Path) -> tuple[float, subprocess.CompletedProcess]:
    """Seconds of one `python -m elvis_cli ARGS` on `code`'s package, and what it did; run in
    `work`, since `python -m` looks in the current folder first."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    argv = [sys.executable, "-m", "elvis_cli", *(a.replace("WORK", str(work)) for a in args)]
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, cwd=work, capture_output=True, text=True)
    return time.perf_counter() - started, result


def median_time(args: list[str], expected: int, code: Path, work: Path, runs: int
                ) -> tuple[float | None, str]:
    """Median seconds over `runs` runs and the last line the command printed on stderr (the
    error), or None when the command does not answer as expected (e.g. unknown there)."""
    times = []
    for _ in range(runs):
        seconds, result = elvis(args, code, work)
        if result.returncode != expected:
            return None, (result.stderr.strip().splitlines() or [""])[-1]
        times.append(seconds)
    return statistics.median(times), (result.stderr.strip().splitlines() or [""])[-1]


def remove_query(work: Path) -> None:
    (work / "query.h5").unlink(missing_ok=True)
    shutil.rmtree(work / "query.h5.shards", ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per case (median)")
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose code is timed")
    parser.add_argument("--work", type=Path, default=REPO / "demo-run" / "startup",
                        help="folder for the demo gallery and the outputs")
    options = parser.parse_args()
    work, code = options.work.resolve(), options.code.resolve()
    work.mkdir(parents=True, exist_ok=True)
    remove_query(work)
    if not (work / "gallery.h5").is_file():
        seconds, result = elvis(["extract", f"{DEMO}/g*.jpg", "-o", "WORK/gallery.h5",
                                 "--quiet"], code, work)
        if result.returncode:
            sys.exit(result.stderr)
        print(f"demo gallery extracted in {seconds:.1f} s -> {work / 'gallery.h5'}")
    first, result = elvis(CASES[-2][1], code, work)
    print(f"first search run (compiles numba's kernel if its cache is cold): {first:.2f} s"
          if result.returncode == 0 else "first search run: no search command in this code")
    print(f"code: {code}; {options.runs} runs per case; load average "
          f"{os.getloadavg()[0]:.2f} at the start\n")
    print("| case | median s | answer |\n| --- | ---: | --- |")
    for label, args, expected in CASES:
        seconds, answer = median_time(args, expected, code, work, options.runs)
        shown = "-" if seconds is None else f"{seconds:.2f}"
        print(f"| {label} | {shown} | {answer if expected else ''} |", flush=True)
    times = []
    for _ in range(options.runs):
        pair = [elvis(args, code, work) for args in TWO_COMMANDS]
        remove_query(work)  # extracted afresh each run
        if any(result.returncode for _, result in pair):
            sys.exit("\n".join(result.stderr for _, result in pair))
        times.append(sum(seconds for seconds, _ in pair))
    print(f"| extract one photo + rerank it (two commands) | {statistics.median(times):.2f} | |")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
