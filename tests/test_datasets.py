import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from elvis_cli.datasets import default_data_root, find_datasets, load_dataset
from elvis_cli.errors import InputError

DEMO_ROOT = Path(__file__).resolve().parents[1] / "examples" / "data"


def test_bundled_demo_is_a_valid_revisitop_benchmark():
    ds = load_dataset(DEMO_ROOT, "demo")
    assert ds.protocol == "revisitop"
    assert len(ds.queries) == 15 and len(ds.gallery) == 171
    assert not set(ds.queries) & set(ds.gallery)  # queries are kept out of the gallery
    assert all(p.is_file() for p in ds.gallery_paths() + ds.query_paths())
    owner: dict[int, int] = {}
    for q, entry in enumerate(ds.ground_truth):
        assert len(entry["easy"]) == 2 and len(entry["hard"]) == 4 and len(entry["junk"]) == 1
        for i in np.concatenate([entry["easy"], entry["hard"], entry["junk"]]):
            assert 0 <= i < len(ds.gallery)
            assert owner.setdefault(int(i), q) == q  # no gallery image belongs to two queries
    assert len(ds.gallery) - len(owner) >= 40  # distractors
    for path, box in zip(ds.query_paths(), ds.query_boxes(), strict=True):
        width, height = Image.open(path).size
        x1, y1, x2, y2 = box
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    assert "demo" in find_datasets(DEMO_ROOT)


def _write(root: Path, name: str, data) -> Path:
    (root / name).mkdir(parents=True, exist_ok=True)
    path = root / name / f"gnd_{name}.pkl"
    path.write_bytes(pickle.dumps(data))
    return path


def _valid():
    return {
        "imlist": ["a", "b", "c.png"],
        "qimlist": ["q"],
        "gnd": [{"easy": np.array([0]), "hard": [2], "junk": [], "bbx": [1, 2, 3, 4]}],
    }


def test_fixture_dataset_paths_boxes_and_discovery(tmp_path):
    _write(tmp_path, "mini", _valid())
    (tmp_path / "not_a_dataset").mkdir()
    ds = load_dataset(tmp_path, "mini")
    assert ds.gallery_paths() == [
        tmp_path / "mini" / "jpg" / n for n in ("a.jpg", "b.jpg", "c.png")
    ]
    assert ds.query_paths() == [tmp_path / "mini" / "jpg" / "q.jpg"]
    assert ds.query_boxes() == [(1.0, 2.0, 3.0, 4.0)]
    assert ds.ground_truth[0]["hard"].dtype == np.int64
    assert find_datasets(tmp_path) == ["mini"]
    assert find_datasets(tmp_path / "absent") == []


def test_ok_junk_ground_truth_without_boxes(tmp_path):
    _write(
        tmp_path,
        "inst",
        {
            "imlist": ["x", "y"],
            "qimlist": ["q1", "q2"],
            "gnd": [{"ok": [0], "junk": [1]}, {"ok": [1], "junk": []}],
        },
    )
    ds = load_dataset(tmp_path, "inst")
    assert ds.protocol == "ok-junk"
    assert ds.query_boxes() == [None, None]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("qimlist"), "no 'qimlist'"),
        (lambda d: d.pop("gnd"), "no 'gnd'"),
        (lambda d: d["gnd"][0].pop("hard"), "query 0 has no 'hard'"),
        (lambda d: d["gnd"][0].update(junk=[3]), "gallery image 3, but the gallery has 3"),
        (lambda d: d["gnd"][0].update(easy=[-1]), "gallery image -1"),
        (lambda d: d["qimlist"].append("q2"), "1 entries for 2 queries"),
        (lambda d: d["gnd"][0].update(bbx=[1, 2]), "'bbx' must be"),
    ],
)
def test_bad_ground_truth_is_an_input_error(tmp_path, mutate, message):
    data = _valid()
    mutate(data)
    _write(tmp_path, "bad", data)
    with pytest.raises(InputError, match=message):
        load_dataset(tmp_path, "bad")


def test_missing_folder_or_file_says_how_to_get_it(tmp_path):
    with pytest.raises(InputError, match=r"no dataset 'roxford5k'.*gnd_roxford5k\.pkl"):
        load_dataset(tmp_path, "roxford5k")
    (tmp_path / "rparis6k").mkdir()
    with pytest.raises(InputError, match=r"has no gnd_rparis6k\.pkl.*paris_1\.tgz"):
        load_dataset(tmp_path, "rparis6k")


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("ELVIS_DATA_ROOT", str(tmp_path / "d"))
    assert default_data_root() == tmp_path / "d"
    monkeypatch.delenv("ELVIS_DATA_ROOT")
    monkeypatch.setenv("ELVIS_CACHE", str(tmp_path / "c"))
    assert default_data_root() == tmp_path / "c" / "data"
    monkeypatch.delenv("ELVIS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_root() == tmp_path / ".cache" / "elvis" / "data"
