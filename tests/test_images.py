"""Image discovery and decoding on real files written with PIL from skimage photos."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from elvis_cli.features.images import ImageError, collect_images, decode_image, load_image
from elvis_cli.util.errors import InputError
from tests.helpers import png_header_only


def write(path: Path, array: np.ndarray, **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_args)
    return path


@pytest.fixture(scope="module")
def cat() -> np.ndarray:
    return skimage.data.chelsea()  # (300, 451, 3)


# --- collect_images ------------------------------------------------------------------------------


def test_folder_is_recursive_sorted_and_skips_hidden_and_non_images(tmp_path, cat):
    for name in ["b.png", "a.JPG", "sub/c.jpeg", ".hidden.png", ".cache/d.png", "notes.txt"]:
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".txt"):
            target.write_text("x")
        else:
            write(target, cat[:8, :8], format="PNG")
    root, paths = collect_images(tmp_path)
    assert root == tmp_path
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["a.JPG", "b.png", "sub/c.jpeg"]


def test_folder_survives_symlink_loop_and_follows_file_links(tmp_path, cat):
    write(tmp_path / "imgs" / "x.png", cat[:8, :8])
    os.symlink(tmp_path / "imgs", tmp_path / "imgs" / "loop")
    os.symlink(tmp_path / "imgs" / "x.png", tmp_path / "imgs" / "y.png")
    os.symlink(tmp_path / "missing.png", tmp_path / "imgs" / "dangling.png")
    _, paths = collect_images(tmp_path / "imgs")
    names = [p.relative_to(tmp_path / "imgs").as_posix() for p in paths]
    assert names in (["x.png", "y.png"], ["loop/x.png", "loop/y.png"])


def test_txt_list_keeps_order_relative_to_its_folder(tmp_path, cat):
    write(tmp_path / "data" / "one.png", cat[:8, :8])
    write(tmp_path / "data" / "two.png", cat[:8, :8])
    listing = tmp_path / "data" / "list.txt"
    listing.write_text("# gallery\ntwo.png\n\n  one.png  \n")
    root, paths = collect_images(listing)
    assert root == tmp_path / "data"
    assert paths == [tmp_path / "data" / "two.png", tmp_path / "data" / "one.png"]


def test_glob_root_is_the_non_magic_prefix(tmp_path, cat):
    write(tmp_path / "g" / "a" / "1.png", cat[:8, :8])
    write(tmp_path / "g" / "b" / "2.jpg", cat[:8, :8])
    (tmp_path / "g" / "b" / "3.txt").write_text("x")
    root, paths = collect_images(f"{tmp_path}/g/**/*")
    assert root == tmp_path / "g"
    assert paths == [tmp_path / "g" / "a" / "1.png", tmp_path / "g" / "b" / "2.jpg"]


def test_single_image_file(tmp_path, cat):
    path = write(tmp_path / "one.webp", cat[:8, :8])
    assert collect_images(path) == (tmp_path, [path])


def test_missing_or_empty_sources_are_input_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        collect_images(tmp_path / "empty")
    with pytest.raises(InputError, match="no such file"):
        collect_images(tmp_path / "nope")
    with pytest.raises(InputError, match="no images found"):
        collect_images(f"{tmp_path}/empty/*.png")


# --- load_image: supported inputs ----------------------------------------------------------------


def test_rgb_jpeg_and_png_round_trip(tmp_path, cat):
    png = load_image(write(tmp_path / "c.png", cat))
    assert png.dtype == np.uint8 and png.shape == (300, 451, 3)
    np.testing.assert_array_equal(png, cat)
    jpg = load_image(write(tmp_path / "c.jpg", cat, quality=95))
    assert np.abs(jpg.astype(int) - cat).mean() < 3


def test_exif_orientation_is_applied(tmp_path, cat):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    image = load_image(write(tmp_path / "r.jpg", cat, exif=exif.tobytes()))
    assert image.shape == (451, 300, 3)
    expected = np.rot90(cat, k=-1)
    assert np.abs(image.astype(int) - expected).mean() < 4


def test_grayscale_palette_and_cmyk_become_rgb(tmp_path, cat):
    grey = cat.mean(axis=2).astype(np.uint8)
    loaded = load_image(write(tmp_path / "g.png", grey))
    assert loaded.shape == (300, 451, 3)
    np.testing.assert_array_equal(loaded[..., 0], grey)
    np.testing.assert_array_equal(loaded[..., 2], grey)

    palette = Image.fromarray(cat).quantize(64)
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(
        load_image(tmp_path / "p.png"), np.asarray(palette.convert("RGB"))
    )

    Image.fromarray(cat).convert("CMYK").save(tmp_path / "k.jpg", quality=95)
    assert np.abs(load_image(tmp_path / "k.jpg").astype(int) - cat).mean() < 6


def test_sixteen_bit_png_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896], [65535, 25700, 514]], dtype=np.uint16)
    values = np.repeat(np.repeat(values, 4, axis=0), 4, axis=1)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = load_image(tmp_path / "deep.png")
    assert image[0, ::4, 0].tolist() == [0, 1, 128]
    assert image[4, ::4, 0].tolist() == [255, 100, 2]


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere
    rgba[:, :3, 3] = 255  # left half opaque, right half fully transparent
    image = load_image(write(tmp_path / "a.png", rgba))
    assert image[0, 0].tolist() == [255, 0, 0]
    assert image[0, 5].tolist() == [255, 255, 255]

    palette = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 0, 255])  # index 0 red (made transparent), 1 blue
    palette.save(tmp_path / "pt.png", transparency=0)
    image = load_image(tmp_path / "pt.png")
    assert image[0].tolist() == [[255, 255, 255], [0, 0, 255]]


def test_animated_gif_gives_first_frame(tmp_path):
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    blue = Image.new("RGB", (8, 8), (0, 0, 255))
    red.save(tmp_path / "anim.gif", save_all=True, append_images=[blue])
    image = load_image(tmp_path / "anim.gif")
    assert image[0, 0].tolist() == [255, 0, 0]


def test_crop_box_truncates_like_the_authors_and_is_clipped(tmp_path, cat):
    path = write(tmp_path / "c.png", cat)  # 451 x 300
    decoded = decode_image(path, box=(100.9, 50.7, 600, 120.2))
    np.testing.assert_array_equal(decoded.pixels, cat[50:120, 100:451])  # int(): 50.7 -> 50
    assert decoded.full_side == 451  # the crop's scale comes from the full image
    with pytest.raises(ImageError, match="crop box"):
        load_image(path, box=(500, 0, 600, 10))


# --- load_image: failures ------------------------------------------------------------------------


def test_empty_file(tmp_path):
    (tmp_path / "z.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file") as error:
        load_image(tmp_path / "z.png")
    assert error.value.reason == "empty file"


def test_text_named_jpg(tmp_path):
    (tmp_path / "t.jpg").write_text("definitely not a jpeg\n" * 20)
    with pytest.raises(ImageError, match="not a recognised image"):
        load_image(tmp_path / "t.jpg")


def test_truncated_jpeg(tmp_path, cat):
    buffer = io.BytesIO()
    Image.fromarray(cat).save(buffer, format="JPEG", quality=90)
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(tmp_path / "cut.jpg")


def test_truncated_jpeg_decoded_as_far_as_it_goes_on_request(tmp_path, cat):
    buffer = io.BytesIO()
    Image.fromarray(cat).save(buffer, format="JPEG", quality=90)
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    decoded = decode_image(tmp_path / "cut.jpg", accept_truncated=True)
    assert decoded.pixels.shape == cat.shape and "truncated" in decoded.warning
    assert np.abs(decoded.pixels[:20].astype(int) - cat[:20]).mean() < 6  # the top is there
    # what Pillow gives with its global switch on, as the authors run it
    from PIL import ImageFile

    from elvis_cli.features import images

    images._TRUNCATED.value = True
    try:
        with Image.open(tmp_path / "cut.jpg") as img:
            expected = np.asarray(img.convert("RGB"))
    finally:
        images._TRUNCATED.value = False
    assert ImageFile.LOAD_TRUNCATED_IMAGES is images._TRUNCATED
    np.testing.assert_array_equal(decoded.pixels, expected)
    with pytest.raises(ImageError, match="cannot decode"):  # the switch was this call's only
        load_image(tmp_path / "cut.jpg")


def test_truncated_images_accepted_in_one_thread_only(tmp_path, cat):
    """Decoding runs in a thread pool: one thread accepting truncated data must not make
    another accept it."""
    import threading

    from elvis_cli.features import images

    buffer = io.BytesIO()
    Image.fromarray(cat).save(buffer, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[:3000])
    inside, release = threading.Event(), threading.Event()

    def accept_and_wait() -> None:
        with images._truncated_images_accepted():
            inside.set()
            release.wait(10)

    other = threading.Thread(target=accept_and_wait)
    other.start()
    try:
        assert inside.wait(10)
        with pytest.raises(ImageError, match="cannot decode"):
            load_image(tmp_path / "cut.jpg")
    finally:
        release.set()
        other.join()


def test_too_small(tmp_path):
    with pytest.raises(ImageError, match="too small"):
        load_image(write(tmp_path / "dot.png", np.zeros((1, 1, 3), dtype=np.uint8)))
    with pytest.raises(ImageError, match="too small"):
        load_image(write(tmp_path / "line.png", np.zeros((1, 50, 3), dtype=np.uint8)))


@pytest.mark.parametrize("side", [15_000, 30_000])  # above our limit; 30k is above PIL's too
def test_decompression_bomb_is_rejected_from_the_header(tmp_path, side):
    path = png_header_only(tmp_path / "bomb.png", side, side)
    with pytest.raises(ImageError, match="too large"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "gone.png")


@pytest.mark.subprocess
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory via /proc")
def test_huge_jpeg_is_decoded_reduced_in_bounded_memory(tmp_path):
    """20000 x 20000 (1.2 GB as RGB): the JPEG decoder's 1/8 scaling is used, never full size."""
    path = tmp_path / "huge.jpg"
    make = "import sys; from PIL import Image; Image.new('L', (20000, 20000), 90).save(sys.argv[1])"
    subprocess.run([sys.executable, "-c", make, str(path)], check=True)
    # peak memory of this process alone: VmHWM (ru_maxrss would include the forking parent's)
    probe = ("import re, sys; from elvis_cli.features.images import load_image; "
             "image = load_image(sys.argv[1], box=(0, 0, 10000, 20000)); "
             "status = open('/proc/self/status').read(); "
             "print(*image.shape, image.min(), image.max(), "
             "re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run([sys.executable, "-c", probe, str(path)], env=env,
                            capture_output=True, text=True, check=True)
    height, width, channels, low, high, peak_kib = map(int, result.stdout.split())
    assert (height, width, channels) == (2500, 1250, 3)  # the box was scaled along
    assert 88 <= low <= high <= 92
    assert peak_kib < 400_000  # the interpreter, numpy, PIL and a 2500 px image: well under
