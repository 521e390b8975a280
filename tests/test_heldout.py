"""examples/make_heldout.py: it refuses sources that overlap the demo, training or the reserved
packages, and its view makers and writer give a benchmark that `elvis evaluate` scores."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from elvis_cli.evaluation.datasets import load_dataset
from tests.conftest import SMALL
from tests.helpers import REPO, cli_in, photos

sys.path.insert(0, str(REPO / "examples"))  # sibling scripts, not an installed module
import collect_training_photos
import make_demo
import make_heldout


@pytest.mark.parametrize("taken", [make_demo.SKIMAGE_DATA / "motorcycle_left.png",  # demo
                                   make_demo.SKIMAGE_DATA / "astronaut.png"])  # training
def test_a_source_with_the_bytes_of_a_demo_or_training_photo_is_refused(tmp_path, taken):
    forbidden = make_demo.demo_sources() + [
        path for _, path in collect_training_photos.training_sources()]
    forbidden = [path for path in forbidden if path.is_file()]  # opencv-doc may be absent
    fresh = tmp_path / "fresh.png"
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(fresh)
    make_heldout.check_disjoint([fresh], forbidden)  # new bytes pass
    renamed = tmp_path / "renamed.png"
    shutil.copyfile(taken, renamed)
    with pytest.raises(SystemExit, match=rf"renamed\.png has the same bytes as .*{taken.name}"):
        make_heldout.check_disjoint([fresh, renamed], forbidden)


def test_two_sources_with_the_same_bytes_are_refused(tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(first)
    shutil.copyfile(first, second)
    with pytest.raises(SystemExit, match=r"b\.png has the same bytes as .*a\.png"):
        make_heldout.check_disjoint([first, second], [])


@pytest.mark.parametrize(("where", "package"), [
    ("gnome-backgrounds/usr/share/x.jpg", "gnome-backgrounds"),  # unpacked into its own folder
    ("all/usr/share/wallpapers/Next/contents/images/1.jpg", "plasma-workspace-wallpapers"),
    ("all/usr/share/gcompris-qt/rcc/a.jpg", "gcompris-qt-data")])
def test_a_source_from_a_reserved_package_is_refused_before_any_is_read(tmp_path, where, package):
    with pytest.raises(SystemExit, match=f"from {package}, reserved"):  # the file is never made
        make_heldout.check_disjoint([tmp_path / where], [])


def test_every_listed_source_is_used_once():
    names = [str(path) for path in make_heldout.heldout_sources(Path("/src"))]
    assert len(names) == len(set(names))
    assert len(make_heldout.QUERIES) == 60


def test_content_box_finds_an_object_on_a_flat_backdrop_and_not_in_a_photo():
    stamp = Image.new("RGB", (100, 80), (236, 236, 232))
    stamp.paste(Image.fromarray(photos()["coffee"]).resize((30, 20)), (40, 50))
    assert make_heldout.content_box(stamp) == (40.0, 50.0, 70.0, 70.0)
    assert make_heldout.content_box(Image.fromarray(photos()["astronaut"])) is None


def test_a_part_is_taken_where_the_photo_has_texture():
    """Half sky, half texture: the 5-15% part must not be a patch of blank sky."""
    texture = Image.fromarray(photos()["astronaut"]).resize((400, 200))
    photo = Image.new("RGB", (400, 400), (150, 185, 225))
    photo.paste(texture, (0, 200))
    views = make_heldout.HardViews(photo, None, [photo])
    for seed in range(5):
        part = np.asarray(views.part(np.random.default_rng(seed)).convert("L"))
        assert part.std() > 10


def tiny_benchmark(root: Path) -> dict:
    """Two queries and one distractor from real photos through the held-out view makers,
    written as make_heldout.build writes it."""
    images = {name: Image.fromarray(pixels) for name, pixels in photos().items()}
    landscapes = [images["rocket"]]
    gallery = make_heldout.query_views(0, images["astronaut"], images["cat"], [], landscapes)
    gallery += make_heldout.query_views(1, images["coffee"], None, [images["cat"]], landscapes)
    gallery += make_heldout.distractor_views(0, images["rocket"], landscapes)
    queries = [make_demo.query_image(images[n], None) for n in ("astronaut", "coffee")]
    return make_demo.write_benchmark(gallery, queries, root, make_heldout.SEED)


def test_views_are_the_same_on_every_run(tmp_path):
    first, second = tiny_benchmark(tmp_path / "a" / "tiny"), tiny_benchmark(tmp_path / "b" / "tiny")
    assert first == second
    for name in first["imlist"]:
        one = (tmp_path / "a" / "tiny" / "jpg" / f"{name}.jpg").read_bytes()
        assert one == (tmp_path / "b" / "tiny" / "jpg" / f"{name}.jpg").read_bytes()


def test_the_written_benchmark_has_the_declared_roles_and_evaluate_scores_it(tmp_path):
    gnd = tiny_benchmark(tmp_path / "data" / "tiny")
    dataset = load_dataset(tmp_path / "data", "tiny")
    assert len(dataset.query_paths()) == 2 and len(dataset.gallery_paths()) == 8 + 9 + 3
    assert all(path.is_file() for path in dataset.gallery_paths() + dataset.query_paths())
    # 1 easy, 6 hard (the second: the real second view, cat), 1 junk (+ the related photo)
    assert [(len(g["easy"]), len(g["hard"]), len(g["junk"])) for g in gnd["gnd"]] == [
        (1, 6, 1), (1, 6, 2)]
    result = cli_in("evaluate", "--data-root", "data", "--dataset", "tiny", *SMALL,
                    "--model", "global", "--shortlist", "0", "--out-dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(row["dataset"], row["protocol"], row["model"]) for row in rows] == [
        ("tiny", "medium/hard", "global")]
    assert 0 < rows[0]["map_hard"] <= 100 and 0 < rows[0]["map_medium"] <= 100
