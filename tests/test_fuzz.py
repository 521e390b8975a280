"""Property tests: whatever bytes an image file holds, and whatever an HDF5 file contains, the
loaders either succeed with a well-formed result or raise our one-line error type.

Byte-level corruption of HDF5 files is limited to truncation: flipped bytes inside HDF5
metadata can crash libhdf5 itself (SIGSEGV, found by this suite), which no Python code can
catch; README "Untrusted files" says so.
"""

import io
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import skimage.data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from elvis_cli.features.images import ImageError, load_image
from elvis_cli.features.layout import FORMAT, shard_path
from elvis_cli.features.store import FeatureStore
from elvis_cli.features.writer import finalize, write_shard
from elvis_cli.util.errors import InputError

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,  # repeatable
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _encoded(fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    photo = skimage.data.chelsea()[:48, :64]
    Image.fromarray(photo).save(buffer, format=fmt, **options)
    return buffer.getvalue()


SEEDS = {
    "png": _encoded("PNG"),
    "jpg": _encoded("JPEG", quality=80),
    "gif": _encoded("GIF", save_all=True, append_images=[Image.new("RGB", (64, 48))]),
    "tif": _encoded("TIFF"),
    "webp": _encoded("WEBP"),
    "bmp": _encoded("BMP"),
}
EDIT = st.tuples(st.floats(0, 1), st.integers(0, 255), st.sampled_from(["set", "cut", "insert"]))


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


def check_loader(path: Path) -> None:
    try:
        image = load_image(path)
    except ImageError as error:
        assert "\n" not in str(error) and error.reason
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert min(image.shape[:2]) >= 2


@FUZZ
@given(suffix=st.sampled_from(sorted(SEEDS)), edits=st.lists(EDIT, min_size=1, max_size=6))
def test_loader_on_damaged_images(scratch, suffix, edits):
    data = bytearray(SEEDS[suffix])
    for where, value, kind in edits:
        position = int(where * len(data))
        if kind == "set" and position < len(data):
            data[position] = value
        elif kind == "cut":
            del data[position:]
        else:
            data[position:position] = bytes([value]) * (1 + value % 7)
    path = scratch / f"damaged.{suffix}"
    path.write_bytes(bytes(data))
    check_loader(path)


@FUZZ
@given(data=st.binary(max_size=512), suffix=st.sampled_from(sorted(SEEDS)))
def test_loader_on_random_bytes(scratch, data, suffix):
    path = scratch / f"random.{suffix}"
    path.write_bytes(data)
    check_loader(path)


DTYPES = [np.float16, np.float32, np.float64, np.int8, np.uint16, np.bool_, np.complex64,
          "S3", np.dtype([("metadata", "f4"), ("descriptor", "u1")])]
SHAPES = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)
VALUES = st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1,
                  max_size=8)
TEXT = st.one_of(st.text(st.characters(exclude_characters="\x00"), max_size=20),
                 st.sampled_from(['{"name": "x"}', "[1, 2]", "{}"]))


def _fill(shape: tuple, dtype, values: list[float]) -> np.ndarray:
    base = np.resize(np.array(values, dtype=np.float32), int(np.prod(shape)) or 0)
    base = base.reshape(shape)
    kind = np.dtype(dtype)
    if kind.names or kind.kind == "S":
        return np.zeros(shape, dtype=kind)
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values are the point
        if kind.kind in "iub":
            return np.nan_to_num(base, nan=0, posinf=1, neginf=-1).astype(kind)
        return base.astype(kind)


DATASET = st.tuples(SHAPES, st.sampled_from(DTYPES), VALUES)


@FUZZ
@given(
    features=DATASET,
    ours=st.booleans(),
    others=st.dictionaries(st.sampled_from(["global", "paths", "ids", "sizes"]), DATASET),
    attributes=st.dictionaries(st.sampled_from(["backbone", "root", "shards"]), TEXT),
)
def test_feature_store_on_arbitrary_hdf5_contents(scratch, features, ours, others, attributes):
    path = scratch / "arbitrary.h5"
    with h5py.File(path, "w") as file:
        for name, (shape, dtype, values) in {"features": features, **others}.items():
            file.create_dataset(name, data=_fill(shape, dtype, values))
        file.attrs.update(attributes)
        if ours:
            file.attrs["format"] = FORMAT
    try:
        with FeatureStore.open(path) as store:
            if store.global_dim is not None:
                store.global_descriptors()
            descriptors, mask = store.local_descriptors(range(store.num_images))
            assert np.isfinite(descriptors[~mask]).all()
    except InputError as error:
        assert "\n" not in str(error)


@pytest.fixture(scope="module")
def sharded(scratch) -> dict[Path, bytes]:
    rng = np.random.default_rng(0)
    output = scratch / "sharded" / "f.h5"
    for index, count in enumerate([2, 3]):
        write_shard(shard_path(output, index), rng.standard_normal((count, 4, 9)),
                    rng.standard_normal((count, 3)), [f"{index}-{i}" for i in range(count)],
                    ["id"] * count, np.ones((count, 2)))
    finalize(output, [shard_path(output, 0), shard_path(output, 1)], {"name": "x"}, scratch)
    return {path: path.read_bytes() for path in [output, shard_path(output, 0),
                                                 shard_path(output, 1)]}


@FUZZ
@given(which=st.integers(0, 2), keep=st.floats(0, 1, exclude_max=True))
def test_feature_store_on_truncated_files(sharded, which, keep):
    for path, data in sharded.items():
        path.write_bytes(data)
    joined, *_ = targets = list(sharded)
    target = targets[which]
    target.write_bytes(sharded[target][: int(keep * len(sharded[target]))])
    with pytest.raises(InputError), FeatureStore.open(joined) as store:
        store.global_descriptors()
        store.read_local(range(store.num_images))
