"""`elvis report`: the results page of a re-ranking output, from real images, a real benchmark's
ground truth and real result files; and the page opened in a real browser (headless Chromium).
"""

import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from elvis_cli import ReportConfig, report_results
from elvis_cli.reporting.page import explain_picture_name
from elvis_cli.retrieval.result_files import write_results
from tests.conftest import SMALL
from tests.helpers import (
    cli_in,
    loaded_images_in_chromium,
    one_line_error,
    run_cli,
    write_revisitop,
    write_views,
)

QUERIES = ["astronaut_0", "cat_0"]
GALLERY = ["astronaut_1", "cat_1", "coffee_0", "coffee_1", "rocket_0", "rocket_1"]
# astronaut_0: astronaut_1 easy, coffee_0 junk; cat_0: cat_1 hard
GND = [{"easy": [0], "hard": [], "junk": [2]}, {"easy": [], "hard": [1], "junk": []}]
# per query: gallery images in global order with their global scores, and the re-ranked order
GLOBAL = {0: (["coffee_0", "rocket_0", "astronaut_1", "cat_1", "coffee_1", "rocket_1"],
              [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]),
          1: (["rocket_1", "cat_1", "coffee_1", "astronaut_1", "rocket_0", "coffee_0"],
              [0.95, 0.85, 0.75, 0.65, 0.55, 0.45])}
RERANKED = {0: ["astronaut_1", "coffee_0", "rocket_0"], 1: ["cat_1", "rocket_1", "coffee_1"]}


def results_table(folder: str) -> pd.DataFrame:
    """A re-ranking output as `elvis rerank` writes it: the top 3 of each list re-ranked, the
    rest in global order (raw and fused scores NaN)."""
    rows = []
    for query, (names, scores) in GLOBAL.items():
        order = RERANKED[query] + [name for name in names if name not in RERANKED[query]]
        for rank, name in enumerate(order, start=1):
            head = rank <= 3
            rows.append({"query_index": query, "query_path": f"{folder}/{QUERIES[query]}.jpg",
                         "rank": rank, "gallery_index": GALLERY.index(name),
                         "gallery_path": f"{folder}/{name}.jpg",
                         "global_score": scores[names.index(name)],
                         "raw_score": 100.0 - rank if head else np.nan,
                         "score": 1.0 - rank / 10 if head else np.nan})
    return pd.DataFrame(rows)


@pytest.fixture
def bench(tmp_path) -> SimpleNamespace:
    """data/toy (revisitop layout, real photos) and its re-ranking output results.csv, in the
    current folder `cwd`."""
    write_views(tmp_path / "data" / "toy" / "jpg")
    write_revisitop(tmp_path / "data" / "toy", QUERIES, GALLERY, GND)
    write_results(results_table("data/toy/jpg"), tmp_path / "results.csv")
    return SimpleNamespace(cwd=tmp_path, results=tmp_path / "results.csv")


def report(bench: SimpleNamespace, *args: object):
    return cli_in("report", "results.csv", "-o", "page", *args, cwd=bench.cwd)


def items(html: str, heading: str) -> list[tuple[str, str]]:
    """(class, text) of each result under `heading` ("before" or "after") of each query."""
    found = []
    for block in re.findall(rf"<h3>{heading}:.*?</ol>", html, flags=re.S):
        found += re.findall(r'<li class="([a-z]*)">(.*?)</li>', block, flags=re.S)
    return found


def test_help_has_an_example_and_sizes_are_checked():
    code, out, _ = run_cli("report", "--help")
    assert code == 0 and "Example: elvis report demo-run/reranked.csv" in out
    assert run_cli("report", "x.csv", "--top", "0")[0] == 2  # usage error


def test_page_shows_both_rankings_with_ground_truth_colours_and_rank_changes(bench):
    result = report(bench, "--data-root", "data", "--dataset", "toy", "--top", "4")
    assert result.returncode == 0, result.stderr
    assert "2 queries on 1 page(s), 8 thumbnails" in result.stdout
    assert "coloured by toy, Medium protocol" in result.stdout
    html = (bench.cwd / "page" / "index.html").read_text()
    after, before = items(html, "after"), items(html, "before")
    assert [label for label, _ in after] == ["positive", "junk", "negative", "negative",
                                             "positive", "negative", "negative", "negative"]
    assert [label for label, _ in before] == ["junk", "negative", "positive", "negative",
                                              "negative", "positive", "negative", "negative"]
    first = after[0][1]  # astronaut_1: global #3, re-ranked #1
    assert "astronaut_1.jpg" in first and "<b>#1</b>" in first and "▲2" in first
    assert "score 0.900 (raw 99.0)" in first
    assert "▼1" in after[1][1] and "→ #2" in before[0][1]
    assert "not re-ranked" in after[3][1]  # rank 4, beyond the re-ranked 3
    assert "positives in the top 4: 1 before, 1 after" in html


def test_page_is_self_contained_and_its_thumbnails_are_real_small_jpegs(bench):
    assert report(bench).returncode == 0
    folder = bench.cwd / "page"
    html = (folder / "index.html").read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # nothing from the network
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == 2 * (1 + 2 * 6) and len(set(sources)) == 8
    for source in set(sources):
        with Image.open(folder / source) as thumbnail:
            assert thumbnail.format == "JPEG" and max(thumbnail.size) <= 160
    assert "No ground truth given: results are not coloured." in html
    assert not items(html, "after")[0][0]  # no colour class


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_every_results_format_gives_the_same_page(bench, suffix):
    assert report(bench).returncode == 0
    write_results(results_table("data/toy/jpg"), bench.cwd / f"results{suffix}")
    result = cli_in("report", f"results{suffix}", "-o", "other", cwd=bench.cwd)
    assert result.returncode == 0, result.stderr
    pages = [(bench.cwd / name / "index.html").read_text() for name in ("page", "other")]
    assert pages[0].replace("results.csv", "X") == pages[1].replace(f"results{suffix}", "X")


def test_large_runs_are_paged_and_thumbnails_bounded(bench):
    result = report(bench, "--per-page", "1", "--max-thumbnails", "3")
    assert result.returncode == 0, result.stderr
    folder = bench.cwd / "page"
    assert sorted(path.name for path in folder.glob("*.html")) == ["index.html", "page-2.html"]
    assert len(list((folder / "thumbs").iterdir())) == 3
    first, second = ((folder / name).read_text() for name in ("index.html", "page-2.html"))
    assert "astronaut_0.jpg</h2>" in first and "cat_0.jpg</h2>" not in first
    assert "cat_0.jpg</h2>" in second and '<a href="index.html">1</a>' in second
    # the first 3 images met (the query, its global top 2) twice each but the query; the
    # rest shown by name
    assert len(re.findall(r"<img ", first)) == 5
    assert len(re.findall(r'class="missing"', first)) == 13 - 5
    assert len(re.findall(r"<img ", second)) == 4  # coffee_0 and rocket_0, in both lists


def test_explain_pictures_of_the_best_pairs_are_linked(bench):
    drawn = []

    def explain(query: str, gallery: str, png: Path) -> Path:
        drawn.append((Path(query).name, Path(gallery).name))
        Image.new("RGB", (40, 20), (200, 30, 30)).save(png)
        return png

    run = report_results(bench.results, bench.cwd / "page", explain=explain,
                         config=ReportConfig(explain_top=2))
    assert run.explained == 4
    assert drawn == [("astronaut_0.jpg", "astronaut_1.jpg"), ("astronaut_0.jpg", "coffee_0.jpg"),
                     ("cat_0.jpg", "cat_1.jpg"), ("cat_0.jpg", "rocket_1.jpg")]
    html = (bench.cwd / "page" / "index.html").read_text()
    links = re.findall(r'<a class="explain" href="([^"]+)">', html)
    name = explain_picture_name("data/toy/jpg/astronaut_0.jpg", "data/toy/jpg/astronaut_1.jpg")
    assert name == "explain/astronaut_0__astronaut_1.png"
    assert name in links and len(set(links)) == 4 and len(links) == 2 * 4  # before and after
    with Image.open(bench.cwd / "page" / name) as picture:
        assert picture.size == (40, 20)
    # a report written again keeps them (pictures made on demand stay linked)
    assert report_results(bench.results, bench.cwd / "page").explained == 4


def test_with_its_features_the_best_pairs_get_elvis_explain_pictures(bench):
    assert cli_in("extract", "data/toy/jpg", "-o", "feats.h5", *SMALL,
                  cwd=bench.cwd).returncode == 0
    result = report(bench, "--features", "feats.h5", "--explain-top", "1")
    assert result.returncode == 0, result.stderr
    assert "2 explain pictures" in result.stdout
    pictures = {f"explain/{picture.name}" for picture in (bench.cwd / "page" / "explain").iterdir()}
    assert pictures == {"explain/astronaut_0__astronaut_1.png", "explain/cat_0__cat_1.png"}
    for picture in pictures:  # elvis explain's picture: photos, correspondences, text
        with Image.open(bench.cwd / "page" / picture) as image:
            assert image.width > 400 and image.height > 400
    html = (bench.cwd / "page" / "index.html").read_text()
    assert set(re.findall(r'<a class="explain" href="([^"]+)">', html)) == pictures


def test_evaluation_table_and_curve_are_summarised_at_the_top(bench):
    (bench.cwd / "eval").mkdir()
    shutil.copyfile(Path(__file__).parent.parent / "docs" / "demo" / "runtime.png",
                    bench.cwd / "eval" / "runtime.png")
    pd.DataFrame([
        {"dataset": "toy", "metric": "m", "model": "global", "shortlist": 0, "map": 50.0,
         "map_medium": 60.0, "map_hard": 40.0, "grid": False},
        {"dataset": "toy", "metric": "m", "model": "elvis", "shortlist": 3, "map": 70.123,
         "map_medium": 80.0, "map_hard": 60.0, "grid": False},
    ]).to_csv(bench.cwd / "eval" / "results.csv", index=False)
    assert report(bench, "--evaluation", "eval").returncode == 0
    html = (bench.cwd / "page" / "index.html").read_text()
    assert "<th>elvis@3</th>" in html and "<td>70.12</td>" in html
    assert '<img class="curve" src="runtime.png"' in html
    assert (bench.cwd / "page" / "runtime.png").read_bytes() == (
        bench.cwd / "eval" / "runtime.png").read_bytes()
    assert report(bench).returncode == 0  # default: the results' folder, which has neither
    assert "<h2>Evaluation</h2>" not in (bench.cwd / "page" / "index.html").read_text()


def test_an_unreadable_image_is_named_and_shown_by_name(bench):
    (bench.cwd / "data" / "toy" / "jpg" / "rocket_1.jpg").write_bytes(b"not an image")
    result = report(bench)
    assert result.returncode == 0
    assert result.stderr == "elvis: no thumbnail of data/toy/jpg/rocket_1.jpg: not readable\n"
    assert "7 thumbnails" in result.stdout
    html = (bench.cwd / "page" / "index.html").read_text()
    assert html.count('<div class="missing">rocket_1.jpg</div>') == 2 * 2  # both lists, both


@pytest.mark.parametrize(("content", "fragment"), [
    ("", "cannot read results results.csv"),
    ("query_index,query_path,rank,gallery_index,gallery_path,global_score,raw_score,score\n",
     "results.csv holds no results"),
    ("a,b\n1,2\n", "results.csv is not a re-ranking output: no column query_index"),
])
def test_unreadable_or_empty_results_are_one_line_and_write_nothing(bench, content, fragment):
    bench.results.write_text(content)
    one_line_error(report(bench), fragment)
    assert not (bench.cwd / "page").exists()
    assert [path.name for path in bench.cwd.iterdir() if path.name.startswith(".")] == []


def test_json_lines_that_are_not_a_reranking_output_name_the_line(bench):
    (bench.cwd / "results.jsonl").write_text('\n{"query_index": 0, "query_path": "q.jpg"}\n')
    one_line_error(cli_in("report", "results.jsonl", "-o", "page", cwd=bench.cwd),
                   "results.jsonl: line 2 is not a query of a re-ranking output (no ranking)")


def test_results_made_on_other_queries_than_the_ground_truth_are_refused(bench):
    write_revisitop(bench.cwd / "data" / "toy", ["coffee_1", "cat_0"], GALLERY, GND)
    one_line_error(report(bench, "--data-root", "data", "--dataset", "toy"),
                   "query data/toy/jpg/astronaut_0.jpg of the results is not a query of "
                   "toy's ground truth")
    assert not (bench.cwd / "page").exists()


def test_a_failed_run_leaves_the_earlier_report_and_never_replaces_other_folders(bench):
    assert report(bench).returncode == 0
    before = (bench.cwd / "page" / "index.html").read_text()
    bench.results.write_text("not,a,table\n")
    one_line_error(report(bench), "is not a re-ranking output")
    assert (bench.cwd / "page" / "index.html").read_text() == before
    (bench.cwd / "mine").mkdir()
    (bench.cwd / "mine" / "notes.txt").write_text("keep")
    one_line_error(cli_in("report", "results.csv", "-o", "mine", cwd=bench.cwd),
                   "mine is not empty and holds no earlier report")
    assert (bench.cwd / "mine" / "notes.txt").read_text() == "keep"


def test_a_run_failing_halfway_leaves_no_partial_folder(bench):
    assert report(bench).returncode == 0
    before = sorted(path.name for path in (bench.cwd / "page").rglob("*"))

    def broken(query: str, gallery: str, png: Path) -> Path:
        raise RuntimeError("drawing failed")

    with pytest.raises(RuntimeError, match="drawing failed"):
        report_results(bench.results, bench.cwd / "page", explain=broken)
    assert sorted(path.name for path in (bench.cwd / "page").rglob("*")) == before
    assert not [path for path in bench.cwd.iterdir() if path.name.startswith(".")]


def test_evaluate_report_writes_a_coloured_page_per_dataset(tmp_path):
    names = write_views(tmp_path / "data" / "mini" / "jpg")
    gnd = [{"easy": [0], "hard": [], "junk": [1]}] + [
        {"easy": [], "hard": [i], "junk": []} for i in range(1, 4)]
    write_revisitop(tmp_path / "data" / "mini", names[0::2], names[1::2], gnd)
    result = cli_in("evaluate", "--data-root", "data", "--dataset", "mini", *SMALL,
                    "--model", "global,chamfer", "--shortlist", "0", "3", "--out-dir", "out",
                    "--report", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "results page -> out/report/mini/index.html" in result.stdout
    html = (tmp_path / "out" / "report" / "mini" / "index.html").read_text()
    assert "Results: elvis evaluate: mini, chamfer@3, medium protocol." in html
    assert "Ground truth: mini, Medium protocol" in html
    assert len(re.findall(r"<section class=\"query\">", html)) == 4
    labels = [label for label, _ in items(html, "after")]
    assert len(labels) == 4 * 4 and labels.count("positive") == 4  # each query's one positive
    assert labels.count("junk") == 1  # query 0's junk, moved behind the re-ranked slots
    assert "<th>chamfer@3</th>" in html and 'src="runtime.png"' in html
    assert not (tmp_path / "out" / "parts").exists()  # kept for a resume only until done


@pytest.mark.slow
@pytest.mark.subprocess
def test_page_renders_in_headless_chromium_with_every_image_loaded(bench, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium: `make test` installs Debian's package where apt-get runs "
                    "as root")
    assert report(bench, "--data-root", "data", "--dataset", "toy").returncode == 0
    page = bench.cwd / "page" / "index.html"
    assert loaded_images_in_chromium(page, browser) == (26, 26)
    screenshot = tmp_path / "screenshot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,900", f"--screenshot={screenshot}", page.as_uri()],
                   capture_output=True, timeout=60, check=True)
    with Image.open(screenshot) as shot:
        pixels = np.asarray(shot.convert("RGB"))
    assert pixels.shape == (900, 1200, 3)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours > 1000  # photos, text and borders, not a blank page
