"""Sharded HDF5 feature files: write, join, move, read in any order, and the official layout."""

import shutil

import h5py
import numpy as np
import pytest

from elvis_cli.features.layout import FORMAT, shard_path
from elvis_cli.features.store import FeatureStore
from elvis_cli.features.writer import finalize, write_shard
from elvis_cli.util.errors import InputError

K, D, DG = 6, 4, 3
SETTINGS = {"name": "efficientnet-lite0", "num_local": K}


def make_rows(rng: np.random.Generator, count: int, real: int = K) -> np.ndarray:
    """(count, K, 5 + D) rows in the official layout; rows past `real` are padding."""
    rows = np.zeros((count, K, 5 + D), dtype=np.float32)
    rows[:, :real, :2] = rng.random((count, real, 2))
    rows[:, :real, 4] = np.sort(rng.random((count, real)), axis=1)[:, ::-1]
    rows[:, :real, 5:] = rng.standard_normal((count, real, D))
    rows[:, real:, 3] = 1
    return rows


@pytest.fixture
def store_file(tmp_path):
    """Three shards (2 images, 0 images, 3 images) joined into tmp_path/out/f.h5."""
    rng = np.random.default_rng(0)
    output = tmp_path / "out" / "f.h5"
    sizes = [2, 0, 3]
    rows = [make_rows(rng, n, real=4) for n in sizes]
    glob = [rng.standard_normal((n, DG)).astype(np.float32) for n in sizes]
    names = [[f"s{s}/img{i}.jpg" for i in range(n)] for s, n in enumerate(sizes)]
    for index, count in enumerate(sizes):
        write_shard(
            shard_path(output, index),
            rows[index],
            glob[index],
            names[index],
            [f"{index:02d}{i:014x}" for i in range(count)],
            np.full((count, 2), [640 + index, 480], dtype=np.int32),
        )
    finalize(output, [shard_path(output, i) for i in range(3)], SETTINGS, tmp_path)
    expected = {
        "rows": np.concatenate(rows),
        "global": np.concatenate(glob),
        "paths": [name for shard in names for name in shard],
    }
    return output, expected


def test_round_trip_of_joined_shards(store_file, tmp_path):
    output, expected = store_file
    with FeatureStore.open(output) as store:
        assert (store.num_images, store.num_local, store.local_dim, store.global_dim) == (
            5,
            K,
            D,
            DG,
        )
        assert store.paths == expected["paths"]
        assert store.ids[0] == "00" + "0" * 14 and store.ids[2] == "02" + "0" * 14
        np.testing.assert_array_equal(store.sizes[:, 0], [640, 640, 642, 642, 642])
        assert store.backbone_settings == SETTINGS
        assert store.root == tmp_path.resolve()
        np.testing.assert_array_equal(store.global_descriptors(), expected["global"])


def test_local_descriptors_any_order_with_duplicates(store_file):
    output, expected = store_file
    rows = expected["rows"].astype(np.float16).astype(np.float32)
    order = [4, 0, 0, 3, 1, 4, 2]
    with FeatureStore.open(output) as store:
        desc, mask = store.local_descriptors(order)
        np.testing.assert_array_equal(desc, rows[order, :, 5:])
        np.testing.assert_array_equal(mask, rows[order, :, 3] == 1)
        assert mask[:, 4:].all() and not mask[:, :4].any()
        short, short_mask = store.local_descriptors(np.array([2, 1]), num_local=3)
        np.testing.assert_array_equal(short, rows[[2, 1], :3, 5:])
        assert short_mask.shape == (2, 3)
        np.testing.assert_array_equal(store.read_local([3])[0], rows[3])
        assert store.local_descriptors([])[0].shape == (0, K, D)
        with pytest.raises(InputError, match="out of range"):
            store.local_descriptors([5])
        with pytest.raises(InputError, match="num_local"):
            store.local_descriptors([0], num_local=K + 1)


def test_joined_file_maps_chosen_rows_in_any_order(store_file, tmp_path):
    output, expected = store_file
    rows = [(2, 2), (0, 0), (2, 0), (2, 1)]  # shard 0's second image left out
    picked = [4, 0, 2, 3]  # the same images' rows in the file joined over everything
    shards = [shard_path(output, i) for i in range(3)]
    record = finalize(output, shards, SETTINGS, tmp_path, rows)
    assert record["bytes"] == output.stat().st_size
    with FeatureStore.open(output) as store:
        assert store.paths == [expected["paths"][i] for i in picked]
        assert store.ids == [f"{s:02d}{r:014x}" for s, r in rows]
        np.testing.assert_array_equal(store.global_descriptors(), expected["global"][picked])
        np.testing.assert_array_equal(store.read_local([1, 0]),
                                      expected["rows"][[0, 4]].astype(np.float16))


def test_file_and_shards_move_together(store_file, tmp_path):
    output, expected = store_file
    shutil.move(output.parent, tmp_path / "moved")
    with FeatureStore.open(tmp_path / "moved" / "f.h5") as store:
        assert store.paths == expected["paths"]
        np.testing.assert_array_equal(store.global_descriptors(), expected["global"])


def test_missing_shard_is_reported(store_file):
    output, _ = store_file
    shard_path(output, 2).unlink()
    with pytest.raises(InputError, match="missing shard"):
        FeatureStore.open(output)


def test_all_empty_shards_make_an_empty_store(tmp_path):
    output = tmp_path / "empty.h5"
    empty = np.zeros((0, K, 5 + D)), np.zeros((0, DG)), [], [], np.zeros((0, 2))
    write_shard(shard_path(output, 0), *empty)
    finalize(output, [shard_path(output, 0)], SETTINGS, tmp_path)
    with FeatureStore.open(output) as store:
        assert store.num_images == 0 and store.num_local == K and store.global_dim == DG
        assert store.global_descriptors().shape == (0, DG)


def test_official_local_file_opens(tmp_path):
    rows = make_rows(np.random.default_rng(1), 4, real=5)
    with h5py.File(tmp_path / "dinov2_gallery_local.hdf5", "w") as file:
        file.create_dataset("features", data=rows)  # float32, as some releases store it
    with FeatureStore.open(tmp_path / "dinov2_gallery_local.hdf5") as store:
        assert (store.num_images, store.num_local, store.local_dim) == (4, K, D)
        assert store.paths == ["0", "1", "2", "3"] and store.ids == store.paths
        assert store.backbone_settings is None and store.global_dim is None and store.root is None
        desc, mask = store.local_descriptors([3, 0])
        np.testing.assert_array_equal(desc, rows[[3, 0], :, 5:])
        assert mask[:, 5].all() and not mask[:, :5].any()
        with pytest.raises(InputError, match="no global descriptors"):
            store.global_descriptors()


def test_wrong_layouts_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        FeatureStore.open(tmp_path / "nothing.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(InputError, match="not an HDF5 file"):
        FeatureStore.open(tmp_path / "text.h5")
    with h5py.File(tmp_path / "global.h5", "w") as file:
        file.create_dataset("global", data=np.zeros((3, 8)))
    with pytest.raises(InputError, match=r"global\.h5: no 'features' dataset"):
        FeatureStore.open(tmp_path / "global.h5")
    with h5py.File(tmp_path / "flat.h5", "w") as file:
        file.create_dataset("features", data=np.zeros((3, 8)))
    with pytest.raises(InputError, match="expected"):
        FeatureStore.open(tmp_path / "flat.h5")
    with h5py.File(tmp_path / "ours.h5", "w") as file:
        file.create_dataset("features", data=np.zeros((1, K, 5 + D)))
        file.attrs["format"] = FORMAT
    with pytest.raises(InputError, match="missing global, paths, ids, sizes, backbone, root"):
        FeatureStore.open(tmp_path / "ours.h5")
    with h5py.File(tmp_path / "ours.h5", "a") as file:  # x, y metadata: must not be misread
        file.attrs["format"] = "elvis-cli-features/1"
    with pytest.raises(InputError, match=r"another elvis-cli version.*extract it again"):
        FeatureStore.open(tmp_path / "ours.h5")


def virtual_file(path, source, rows: np.ndarray) -> None:
    """A features file whose data lives in `source` (an official-style chunked release)."""
    with h5py.File(source, "w") as file:
        file.create_dataset("features", data=rows)
    layout = h5py.VirtualLayout(shape=rows.shape, dtype=rows.dtype)
    layout[:] = h5py.VirtualSource(str(source), "features", shape=rows.shape)
    with h5py.File(path, "w") as file:
        file.create_virtual_dataset("features", layout)


@pytest.mark.parametrize("where", ["elsewhere/chunk.h5", "release/../elsewhere/chunk.h5"])
def test_virtual_sources_outside_the_folder_need_permission(tmp_path, where):
    rows = make_rows(np.random.default_rng(2), 3)
    (tmp_path / "release").mkdir()
    (tmp_path / "elsewhere").mkdir()
    path = tmp_path / "release" / "local.hdf5"
    virtual_file(path, tmp_path / where, rows)
    with pytest.raises(InputError, match=r"refers to .*chunk\.h5, outside its folder .*"
                                         r"--allow-external-sources"):
        FeatureStore.open(path)
    with FeatureStore.open(path, allow_external_sources=True) as store:
        np.testing.assert_array_equal(store.read_local([2, 0]), rows[[2, 0]])


def test_virtual_sources_inside_the_folder_are_fine(tmp_path):
    rows = make_rows(np.random.default_rng(3), 2)
    (tmp_path / "chunks").mkdir()
    virtual_file(tmp_path / "local.hdf5", tmp_path / "chunks" / "0.h5", rows)
    with FeatureStore.open(tmp_path / "local.hdf5") as store:
        np.testing.assert_array_equal(store.read_local([1]), rows[[1]])


def test_external_links_and_external_storage_are_refused(tmp_path):
    rows = make_rows(np.random.default_rng(4), 2)
    (tmp_path / "secret").mkdir()
    with h5py.File(tmp_path / "secret" / "data.h5", "w") as file:
        file.create_dataset("features", data=rows)
    (tmp_path / "pub").mkdir()
    with h5py.File(tmp_path / "pub" / "link.h5", "w") as file:
        file["features"] = h5py.ExternalLink(str(tmp_path / "secret" / "data.h5"), "features")
    raw = tmp_path / "secret" / "raw.bin"
    raw.write_bytes(rows.tobytes())
    with h5py.File(tmp_path / "pub" / "raw.h5", "w") as file:
        file.create_dataset("features", shape=rows.shape, dtype=rows.dtype,
                            external=[(str(raw), 0, rows.nbytes)])
    for name in ("link.h5", "raw.h5"):
        with pytest.raises(InputError, match="outside its folder"):
            FeatureStore.open(tmp_path / "pub" / name)
        with FeatureStore.open(tmp_path / "pub" / name, allow_external_sources=True) as store:
            np.testing.assert_array_equal(store.read_local([0, 1]), rows)


def test_non_finite_descriptors_are_named_at_read_time(store_file):
    output, _ = store_file
    rows = make_rows(np.random.default_rng(5), 3, real=4)
    rows[1, 2, 6] = np.nan  # a real row of image 1
    rows[2, 5, 6] = np.inf  # a padding row of image 2: never used, so harmless
    with h5py.File(output.parent / "nan.h5", "w") as file:
        file.create_dataset("features", data=rows)
    with FeatureStore.open(output.parent / "nan.h5") as store:
        store.read_local([0, 2])
        with pytest.raises(InputError, match=r"1 image\(s\) with NaN/inf local descriptors, "
                                             r"first '1' \(row 1\)"):
            store.local_descriptors([2, 1, 0])
    with h5py.File(shard_path(output, 2), "r+") as shard:
        shard["global"][1, 0] = -np.inf
    with FeatureStore.open(output) as store, pytest.raises(
        InputError, match=r"NaN/inf global descriptors, first 's2/img1.jpg' \(row 3\)"
    ):
        store.global_descriptors()


def test_disagreeing_shapes_and_bad_attributes_are_input_errors(tmp_path):
    def ours(name, **datasets):
        with h5py.File(tmp_path / name, "w") as file:
            file.create_dataset("features", data=np.zeros((2, K, 5 + D)))
            names = np.array([b"a", b"b"])
            defaults = {"global": np.zeros((2, 3)), "paths": names, "ids": names,
                        "sizes": np.zeros((2, 2))}
            for key, value in {**defaults, **datasets}.items():
                if key != "bb":
                    file.create_dataset(key, data=value)
            file.attrs.update(format=FORMAT, backbone=datasets.get("bb", "{}"),
                              root="/")
        return tmp_path / name

    with pytest.raises(InputError, match="datasets disagree on their shapes"):
        FeatureStore.open(ours("short.h5", ids=np.zeros(3)))
    with pytest.raises(InputError, match="datasets disagree on their shapes"):
        FeatureStore.open(ours("pooled.h5", **{"global_w-avg": np.zeros((2, 4))}))
    with FeatureStore.open(ours("fine.h5", **{"global_w-avg": np.ones((2, 3))})) as store:
        assert store.global_types == ["cls", "w-avg"]
        np.testing.assert_array_equal(store.global_descriptors("w-avg"), np.ones((2, 3)))
        with pytest.raises(InputError, match="no 'og-avg' global descriptors; it has cls, w-avg"):
            store.global_descriptors("og-avg")
    with pytest.raises(InputError, match="backbone settings are not a JSON object"):
        FeatureStore.open(ours("list.h5", bb="[1]"))
    with pytest.raises(InputError, match="unreadable features file"):
        FeatureStore.open(ours("json.h5", bb="{nope"))
