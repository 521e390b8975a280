import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from elvis_cli.evaluation.datasets import default_data_root, find_datasets, load_dataset
from elvis_cli.util.errors import InputError

DEMO_ROOT = Path(__file__).resolve().parents[1] / "examples" / "data"


def test_bundled_demo_is_a_valid_revisitop_benchmark():
    ds = load_dataset(DEMO_ROOT, "demo")
    assert ds.ground_truth_kind == "revisitop"
    assert len(ds.queries) == 15 and len(ds.gallery) == 171
    assert not set(ds.queries) & set(ds.gallery)  # queries are kept out of the gallery
    assert all(p.is_file() for p in ds.gallery_paths() + ds.query_paths())
    owner: dict[int, int] = {}
    for q, entry in enumerate(ds.ground_truth):
        assert len(entry["easy"]) == 2 and len(entry["hard"]) == 5 and len(entry["junk"]) == 1
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
    assert ds.ground_truth_kind == "ok-junk"
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
    with pytest.raises(InputError, match=r"no dataset 'roxford5k'.*datasets prepare roxford5k"):
        load_dataset(tmp_path, "roxford5k")
    (tmp_path / "rparis6k").mkdir()
    with pytest.raises(InputError, match=r"has no gnd_rparis6k\.pkl.*datasets prepare rparis6k"):
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


def test_class_labelled_lines_exclude_the_query_and_score_by_hand(tmp_path):
    from elvis_cli.evaluation.run import score_rankings

    root = tmp_path / "shop"
    root.mkdir()
    (root / "gallery.txt").write_text(
        "path,class\na.jpg,1\nb.jpg,1\n\nc.jpg,2\nd.jpg,1,x\ne.jpg,\n")
    ds = load_dataset(tmp_path, "shop")
    assert ds.ground_truth_kind == "class" and ds.queries == ds.gallery
    assert find_datasets(tmp_path) == ["shop"]
    assert ds.ground_truth[0]["ok"].tolist() == [1, 3]
    assert ds.ground_truth[0]["junk"].tolist() == [0]
    assert ds.ground_truth[2]["ok"].size == 0 and ds.ground_truth[4]["ok"].size == 0
    ranking = np.array([[0, 2, 1, 4, 3],   # a: own row dropped, hits at 2nd, 4th: (1/2+2/4)/2
                        [1, 0, 3, 2, 4],   # b: hits at 1st, 2nd: 1
                        [2, 0, 1, 3, 4],   # c: no other image of class 2, skipped
                        [3, 2, 4, 0, 1],   # d: hits at 3rd, 4th: (1/3+2/4)/2
                        [4, 0, 1, 2, 3]])  # e: no class, skipped
    scores = score_rankings(ds, {"ok": ranking})
    assert scores["map"] == pytest.approx((50 + 100 + 100 * (1 / 3 + 2 / 4) / 2) / 3)
    assert scores["recall@1"] == pytest.approx(100 / 3) and scores["recall@5"] == 100.0
    (root / "queries.txt").write_text("d.jpg,1\nz.jpg,2\n")  # z: a query outside the gallery
    ds = load_dataset(tmp_path, "shop")
    assert ds.ground_truth[0]["ok"].tolist() == [0, 1] and ds.ground_truth[1]["ok"].tolist() == [2]
    assert ds.ground_truth[1]["junk"].size == 0
    (root / "gallery.txt").write_text("a.jpg\n")
    with pytest.raises(InputError, match=r"gallery.txt: expected `path,class"):
        load_dataset(tmp_path, "shop")


def test_gldv2_public_private_splits_score_by_hand(tmp_path):
    from elvis_cli.evaluation.run import score_rankings

    root = tmp_path / "gldv2-test"
    root.mkdir()
    (root / "index.csv").write_text("id\naaa1\nbbb2\nccc3\nddd4\n")
    (root / "retrieval_solution_v2.1.csv").write_text(
        "id,images,Usage\nq001,aaa1 ccc3,Private\nq002,bbb2,Public\nq003,None,Ignored\n"
        "q004,ddd4,Private\n")
    ds = load_dataset(tmp_path, "gldv2-test")
    assert ds.ground_truth_kind == "gldv2"
    assert ds.gallery_paths()[0] == root / "index" / "a" / "a" / "a" / "aaa1.jpg"
    assert ds.query_paths()[0] == root / "test" / "q" / "0" / "0" / "q002.jpg"  # public first
    assert ds.splits["private"].tolist() == [1, 2]
    ranking = np.array([[1, 0, 2, 3],   # q002 (public): hit at 1st -> 100
                        [1, 0, 3, 2],   # q001 (private): hits at 2nd, 4th -> (1/2+2/4)/2
                        [0, 1, 2, 3]])  # q004 (private): hit at 4th -> 1/4
    scores = score_rankings(ds, {"ok": ranking})
    assert scores["map"] == pytest.approx(37.5)  # private is the headline
    assert scores["map_public"] == pytest.approx(100.0)
    assert scores["map_all"] == pytest.approx((100 + 50 + 25) / 3)
    (root / "retrieval_solution_v2.1.csv").write_text("id,images,Usage\nq1,zzz9,Public\n")
    with pytest.raises(InputError, match=r"lists zzz9, which index\.csv does not"):
        load_dataset(tmp_path, "gldv2-test")


def test_1m_version_appends_the_distractors(tmp_path):
    """The image route: roxford5k's ground truth and images plus the R1M list, rooted in the
    +1M set's own folder (where its features and released files go)."""
    _write(tmp_path, "roxford5k", _valid())
    assert "roxford5k+1m" not in find_datasets(tmp_path)
    with pytest.raises(InputError, match=r"needs its own folder .*revisitop1m\.txt is missing"):
        load_dataset(tmp_path, "roxford5k+1m")
    (tmp_path / "revisitop1m").mkdir()
    (tmp_path / "revisitop1m" / "revisitop1m.txt").write_text("d1\nd2\n")
    ds = load_dataset(tmp_path, "roxford5k+1m")
    assert "roxford5k+1m" in find_datasets(tmp_path)
    assert ds.name == "roxford5k+1m" and ds.root == tmp_path / "roxford5k+1m"
    assert ds.gallery[3:] == ["d1", "d2"] and ds.ground_truth[0]["hard"].tolist() == [2]
    assert ds.gallery_paths()[2] == tmp_path / "roxford5k" / "jpg" / "c.png"
    assert ds.gallery_paths()[4] == tmp_path / "revisitop1m" / "jpg" / "d2.jpg"
    assert load_dataset(tmp_path, "roxford5k").gallery == ds.gallery[:3]  # base untouched


def test_1m_own_folder_ground_truth_wins(tmp_path):
    """The authors' roxford5k+1m/ has its own gnd_roxford5k+1m.pkl; without the distractor
    list its images cannot be located, so extraction is refused rather than run on 5k."""
    _write(tmp_path, "roxford5k", _valid())
    own = _valid()
    own["gnd"][0]["hard"] = [1]
    _write(tmp_path, "roxford5k+1m", own)
    ds = load_dataset(tmp_path, "roxford5k+1m")
    assert ds.root == tmp_path / "roxford5k+1m" and ds.ground_truth[0]["hard"].tolist() == [1]
    with pytest.raises(InputError, match=r"roxford5k\+1m: the images of its 1M distractors"):
        ds.gallery_paths()
    (tmp_path / "revisitop1m").mkdir()
    (tmp_path / "revisitop1m" / "revisitop1m.txt").write_text("d1\n")
    ds = load_dataset(tmp_path, "roxford5k+1m")
    assert ds.gallery_paths()[3] == tmp_path / "revisitop1m" / "jpg" / "d1.jpg"
    assert ds.gallery_paths()[0] == tmp_path / "roxford5k" / "jpg" / "a.jpg"


@pytest.mark.parametrize("old,new", [("roxford5k+r1m", "roxford5k+1m"), ("sop", "sop-1k"),
                                     ("rp2k", "rp2k-test"), ("gldv2", "gldv2-test")])
def test_old_names_are_refused_with_the_authors_name(tmp_path, old, new):
    from elvis_cli.evaluation.prepare import prepare

    for call in (lambda: load_dataset(tmp_path, old), lambda: prepare(old, tmp_path)):
        with pytest.raises(InputError, match=f"{old!r} is now called {new!r}".replace("+", r"\+")):
            call()


def test_the_authors_class_lists_with_sizes(tmp_path):
    """sop-1k as the authors ship it: test_gallery.txt / test_query.txt lines
    `path,class,width,height`; the class is field 1, the size fields are ignored."""
    root = tmp_path / "sop-1k"
    root.mkdir()
    (root / "test_gallery.txt").write_text(
        "bike/a.jpg,7,640,480\nbike/b.jpg,7,500,375\nlamp/c.jpg,9,300,300\n")
    (root / "test_query.txt").write_text("bike/a.jpg,7,640,480\nlamp/c.jpg,9,300,300\n")
    ds = load_dataset(tmp_path, "sop-1k")
    assert ds.ground_truth_kind == "class" and find_datasets(tmp_path) == ["sop-1k"]
    assert ds.gallery == ["bike/a.jpg", "bike/b.jpg", "lamp/c.jpg"]
    assert ds.queries == ["bike/a.jpg", "lamp/c.jpg"]
    assert ds.ground_truth[0]["ok"].tolist() == [1] and ds.ground_truth[0]["junk"].tolist() == [0]
    assert ds.ground_truth[1]["ok"].size == 0
    assert ds.gallery_paths()[1] == root / "jpg" / "bike" / "b.jpg"


def test_released_names_come_from_the_authors_lists(tmp_path):
    from elvis_cli.features.released import image_names

    root = tmp_path / "met"
    root.mkdir()
    assert image_names(root) is None
    (root / "test_query.txt").write_text("q/1.jpg,3,10,10\n")
    (root / "test_gallery.txt").write_text("g/1.jpg,3,10,10\ng/2.jpg,4,10,10\n")
    assert image_names(root) == (["q/1.jpg"], ["g/1.jpg", "g/2.jpg"])


def test_gldv2_test_pickle_carries_its_private_split(tmp_path):
    """gnd_gldv2-test.pkl (ok/junk): ground truth of kind gldv2, private = the last 750 queries."""
    gnd = [{"ok": [q % 3], "junk": []} for q in range(760)]
    _write(tmp_path, "gldv2-test", {"imlist": ["a", "b", "c"],
                                    "qimlist": [f"q{q}" for q in range(760)], "gnd": gnd})
    ds = load_dataset(tmp_path, "gldv2-test")
    assert ds.ground_truth_kind == "gldv2" and ds.map_k == 100
    assert ds.splits["public"].tolist() == list(range(10))
    assert ds.splits["private"].tolist() == list(range(10, 760))
    _write(tmp_path, "instre", {"imlist": ["a"], "qimlist": ["q"],
                                "gnd": [{"ok": [0], "junk": []}]})
    assert load_dataset(tmp_path, "instre").ground_truth_kind == "ok-junk"
