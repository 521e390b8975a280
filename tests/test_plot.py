"""The performance-against-time curve and plot of `elvis evaluate` (one line per method, mAP
against re-ranking time, points labelled with the shortlist size), and the bytes each method
stores per gallery image (`Reranker.bytes_per_image`)."""

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from elvis_cli import Chamfer, ElvisReranker, GlobalRanking, open_local
from elvis_cli.evaluation.report import method_label, plot_runtime, runtime_curve
from tests.helpers import random_model


def row(dataset: str, model: str, shortlist: int, seconds: float, map_: float,
        size: float, **extra) -> dict:
    return {"dataset": dataset, "model": model, "shortlist": shortlist,
            "seconds_per_query": seconds, "map": map_, "bytes_per_image": size, "grid": False,
            **extra}


@pytest.fixture
def table() -> pd.DataFrame:
    """Two datasets; global, elvis and chamfer, elvis also after a post-processing `aqe`
    (with its own global row), and a grid row that must not count."""
    rows = []
    for dataset, shift in (("a", 0.0), ("b", 10.0)):
        rows += [row(dataset, "global", 0, 0.001, 50 + shift, 100, post="none"),
                 row(dataset, "global", 0, 0.002, 52 + shift, 100, post="aqe"),
                 row(dataset, "elvis", 25, 0.1, 60 + shift, 900, post="none"),
                 row(dataset, "elvis", 100, 0.4, 64 + shift, 900, post="none"),
                 row(dataset, "elvis", 100, 0.5, 66 + shift, 900, post="aqe"),
                 row(dataset, "chamfer", 100, 0.03, 55 + shift, 900, post="none"),
                 {**row(dataset, "elvis", 100, 9.0, 99.0, 900, post="none"), "grid": True}]
    return pd.DataFrame(rows)


def test_the_curve_has_a_line_per_method_from_its_global_ranking(table):
    curve = runtime_curve(table)
    assert list(curve.columns) == ["method", "model", "shortlist", "seconds_per_query", "map",
                                   "bytes_per_image", "datasets"]
    lines = {method: list(zip(rows["shortlist"], rows["map"], rows["seconds_per_query"],
                              rows["bytes_per_image"], strict=True))
             for method, rows in curve.groupby("method", sort=False)}
    assert lines == {
        "global": [(0, 55.0, 0.001, 100.0)],
        "global+aqe": [(0, 57.0, 0.002, 100.0)],
        "elvis": [(0, 55.0, 0.001, 100.0), (25, 65.0, 0.1, 900.0), (100, 69.0, 0.4, 900.0)],
        "elvis+aqe": [(0, 57.0, 0.002, 100.0), (100, 71.0, 0.5, 900.0)],
        "chamfer": [(0, 55.0, 0.001, 100.0), (100, 60.0, 0.03, 900.0)]}
    assert set(curve["datasets"]) == {2}
    assert dict(zip(curve["method"], curve["model"], strict=True))["elvis+aqe"] == "elvis"


def test_a_table_without_post_processing_keys_lines_by_model(table):
    plain = table[table["post"] == "none"].drop(columns="post")
    assert list(dict.fromkeys(runtime_curve(plain)["method"])) == ["global", "elvis", "chamfer"]
    assert [method_label("elvis", post) for post in (None, np.nan, "none", "aqe")] == [
        "elvis", "elvis", "elvis", "elvis+aqe"]


def test_the_plot_is_written_as_a_png(table, tmp_path):
    plot_runtime(table, tmp_path / "runtime.png")
    with Image.open(tmp_path / "runtime.png") as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 100
    plot_runtime(table[table["model"] == "global"], tmp_path / "global.png")  # nothing re-ranked
    assert (tmp_path / "global.png").read_bytes()[:4] == b"\x89PNG"


def test_bytes_per_image_counts_what_each_method_reads_as_stored(stores):
    """The gallery stores 14 float16 rows of 5 + 48 numbers per image (106 bytes each) and a
    3-d float32 global descriptor (12 bytes)."""
    _, gallery = stores
    assert (gallery.global_bytes, gallery.local_row_bytes) == (12, 106)
    assert GlobalRanking().bytes_per_image(gallery, 10) == 12
    for reranker in (Chamfer(), ElvisReranker(random_model(48))):
        assert reranker.bytes_per_image(gallery) == 12 + 14 * 106
        assert reranker.bytes_per_image(gallery, 600) == 12 + 14 * 106  # all it stores
        assert reranker.bytes_per_image(gallery, 10) == 12 + 10 * 106


@pytest.mark.parametrize("per_row", [False, True])
def test_binarised_rows_count_their_packed_bits_and_metadata(tmp_path, per_row):
    """The authors' binarised layout, one record per image (N,) of K rows or one per row (N, K):
    128 bits are 16 bytes, with 5 float16 metadata 26 bytes a row; no global file: 0."""
    shape = (1, 6) if per_row else (1,)
    rows = () if per_row else (6,)
    dtype = np.dtype([("metadata", np.float16, (*rows, 5)), ("descriptor", np.uint8, (*rows, 16))])
    with h5py.File(tmp_path / "bits.hdf5", "w") as file:
        file.create_dataset("features", data=np.zeros(shape, dtype=dtype))
    with open_local(tmp_path / "bits.hdf5") as store:
        assert (store.num_local, store.local_row_bytes, store.global_bytes) == (6, 26, 0)
        assert Chamfer().bytes_per_image(store, 4) == 4 * 26
