"""Build a held-out instance-retrieval benchmark (revisitop layout) with hard views.

    apt-get download kphotoalbum libjxl-testdata gimp-help-en stellarium-data \
        visp-images-data tuxpaint-stamps-default
    for f in *.deb; do dpkg -x "$f" heldout-sources; done
    python examples/make_heldout.py --sources heldout-sources --wallpapers WALLPAPERS \
        [--opencv-data DIR] [--out ~/.cache/elvis/data/heldout]

WALLPAPERS is where the training wallpaper packages were unpacked (see
collect_training_photos.py) and --opencv-data the demo's sources (opencv-doc); the README
("Held-out benchmark") has every command.

Its photos come from six Debian packages that neither the demo (make_demo.py: opencv-doc and
scikit-image's motorcycle pair) nor training (collect_training_photos.py) uses: KPhotoAlbum's
demo album, libjxl's test photos, the GIMP manual's tutorial photos, Stellarium's photos of
sky-culture artefacts and its landscape panels, ViSP's test images and Tux Paint's photo
stamps; see examples/LICENSES.md. Before writing anything the script compares every source,
by SHA-256 of its bytes, with every demo and training source (opencv-doc's samples and the
unpacked training wallpapers must be present for that) and refuses on any match. The Debian
packages plasma-workspace-wallpapers, gnome-backgrounds and gcompris-qt-data are reserved
for an independent check and are never used.

Per query: 1 easy view, 6 hard ones (a 5-15% part of the photo; the photo pasted small,
5-12% of the frame, into a landscape; pasted at 15-25% with a strong perspective and light
change; a strong perspective warp; a strong light and colour change; the real second view
where the source has one, else a 25-40 degree rotation or an occlusion), 1 junk (a 3-6%
crop or a heavy blur), and the source's related photos (same person or animal in another
scene) as junk. Distractors are other photos and views of them, and the landscapes
themselves. Every random choice comes from a fixed seed and JPEG quality is fixed, so the
output is the same on every run (given the same Pillow/libjpeg).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops

sys.path.insert(0, str(Path(__file__).resolve().parent))
import collect_training_photos  # sibling scripts, not installed modules
import make_demo
from make_demo import (
    VIEW_SIDE,
    Box,
    GalleryImage,
    Views,
    crop_fraction,
    fit,
    jitter_colour,
    random_box,
    rotate_inside,
    shift_hue,
    warp_perspective,
)

SEED = 1517
DEFAULT_OUT = Path.home() / ".cache" / "elvis" / "data" / "heldout"
# packages reserved for an independent check, and where they install their images
RESERVED_PACKAGES = {"plasma-workspace-wallpapers": "usr/share/wallpapers",
                     "gnome-backgrounds": "usr/share/backgrounds/gnome",
                     "gcompris-qt-data": "usr/share/gcompris-qt"}
OBJECT_BACKDROP = (236, 236, 232)  # behind cut-out objects (Tux Paint stamps)
SKY_BACKDROP = (150, 185, 225)  # behind the transparent sky of Stellarium's landscapes

KPA = "usr/share/kphotoalbum/demo/"
JXL = "usr/share/libjxl-testdata/"
GIMP = "usr/share/gimp/2.0/help/en/images/"
SKY = "usr/share/stellarium/skycultures/"
ARATEA = SKY + "greek_leidenAratea/"
LAND = "usr/share/stellarium/landscapes/"
VISP = "usr/share/visp-images-data/ViSP-images/"
TUX = "usr/share/tuxpaint/stamps/"


@dataclass(frozen=True)
class Source:
    """A query photo, with a real second view of the same scene (a hard positive) and other
    photos of the same person or animal in other scenes (junk: neither right nor wrong)."""

    path: str
    second: str | None = None
    related: tuple[str, ...] = ()


QUERIES: list[Source] = [
    Source(KPA + "grand_canyon_2.jpg", KPA + "grand_canyon_3.jpg", (KPA + "grand_canyon_1.jpg",)),
    Source(KPA + "bar55.jpg", KPA + "bar55_2.jpg"),
    Source(KPA + "pool.jpg", related=(KPA + "pool_2.jpg",)),
    Source(KPA + "donna.jpg", related=(KPA + "donna_2.jpg",)),
    Source(KPA + "jesper.jpg", related=(KPA + "jesper_2.jpg",)),
    Source(KPA + "new_wave_1.jpg", related=(KPA + "new_wave_2.jpg",)),
    Source(KPA + "spiff.jpg", related=(KPA + "spiff_2.jpg",)),
    *[Source(KPA + n + ".jpg") for n in ("anne_helene", "blackie", "cold_water", "qt-logo",
                                         "skagen", "skagen_2", "snow", "sunset", "wayne")],
    Source(GIMP + "tutorials/tone-mapping/apple-orchard-truck-from-camera.jpg",
           GIMP + "tutorials/tone-mapping/truck-tone-mapped-using-gegl-mantuik.jpg"),
    Source(GIMP + "tutorials/tone-mapping/power-lines.jpg"),
    Source(GIMP + "filters/examples/blur/mean_curvature-ex-1.jpg"),
    Source(VISP + "mbt/cube/image0000.pgm", VISP + "mbt/cube/image0200.pgm"),
    Source(VISP + "Solvay/Solvay_conference_1927_Version2_1280x881.jpg"),
    Source(VISP + "Klimt/Klimt.png"),
    *[Source(JXL + n) for n in (
        "jxl/flower/flower.png", "jxl/hdr_room.png",
        "external/wesaturate/500px/cvo9xd_keong_macan_srgb8.png",
        "external/wesaturate/500px/tmshre_riaphotographs_srgb8.png",
        "external/wesaturate/500px/u76c0g_bliznaca_srgb8.png")],
    *[Source(SKY + n) for n in (
        "babylonian_mulapin/800px-MulApin-BritishMuseum.jpg",
        "egyptian_dendera/Dendera_zodiac_Louvre.jpg",
        "greek_farnese/Atlas_(Farnese_Globe).jpg",
        "greek_leidenAratea/descr_pics/Aratea fol. 3v und 4r.jpg")],
    *[Source(ARATEA + f"{n}_Aratea_bg.jpg")
      for n in ("Arg", "Cep", "Cyg", "Eri", "Her", "Oph", "aql", "leo", "tau")],
    Source(TUX + "vehicles/construction/dumper.png",
           related=(TUX + "vehicles/construction/dumper_mirror.png",)),
    *[Source(TUX + n + ".png") for n in (
        "animals/birds/crowned_crane", "animals/birds/helmeted_guineafowl", "animals/fish/lobster",
        "animals/insects/Woodlouse", "animals/mammals/bears/european-bear",
        "animals/mammals/bovines/indian_blackbuck", "food/fruit/Cherry_Stella",
        "food/fruit/avocado", "food/fruit/cherimoya", "food/fruit/orange_seville",
        "food/spices/ginger", "household/Lightbulb", "household/tools/cementmixer",
        "medical/stethoscope", "military/vehicles/infantry-stryker",
        "plants/flowers/anemone_red", "plants/trees/holm_oak", "town/monuments/inukshuk-photo",
        "vehicles/emergency/firetruck")],
]  # fmt: skip
# Photos that appear only as distractors: the photo itself plus two views of it. The
# Aratea figure of Draco is left out: the folio photo above shows it.
DISTRACTORS: list[str] = [
    *[ARATEA + f"{n}_Aratea_bg.jpg" for n in (
        "CMa", "CrB", "Lyr", "and", "ara", "ari", "aur", "boo", "cas", "cet", "cnc", "gem", "hya",
        "ori", "peg", "per", "psa", "psc", "sgr")],
    ARATEA + "aqr_Aratea_b_bg.jpg",
    ARATEA + "cap_Aratea_b_bg.jpg",
    *[TUX + n + ".png" for n in (
        "animals/birds/albino_peahen", "animals/insects/mantis",
        "animals/mammals/bovines/gnu-baby-stand", "food/fruit/Strawberry2",
        "food/fruit/Apricot_whole", "plants/trees/rambutan", "plants/trees/liberia-palm",
        "plants/flowers/daffodil", "vehicles/flight/balloon360", "vehicles/flight/planes/747",
        "vehicles/race/indycar", "vehicles/wheel_tractor", "military/vehicles/bradley",
        "military/vehicles/f22_raptor")],
]  # fmt: skip
# Real scenes the insets are pasted into; each also stands in the gallery as it is.
LANDSCAPES: list[str] = [
    *[LAND + f"hurricane/hurricane{i}.png" for i in range(1, 9)],
    *[LAND + f"garching/garching-gl{i}.png" for i in range(1, 5)],
    LAND + "grossmugl/grossmugl_leeberg_crop11.25_2048.png",
]


def heldout_sources(root: Path) -> list[Path]:
    """Every source file the held-out benchmark reads."""
    names = [s.path for s in QUERIES] + [s.second for s in QUERIES if s.second]
    names += [r for s in QUERIES for r in s.related] + DISTRACTORS + LANDSCAPES
    return [root / name for name in names]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_disjoint(sources: list[Path], forbidden: list[Path]) -> None:
    """Refuse (SystemExit) if a source has the bytes of a forbidden file (a demo or training
    source) or of another source, or lies in a reserved package (a folder named after it, or
    where it installs its images)."""
    for path in sources:
        for package, folder in RESERVED_PACKAGES.items():
            if package in path.parts or f"/{folder}/" in f"/{path.as_posix()}":
                raise SystemExit(f"{path} is from {package}, reserved for an independent check")
    taken = {_sha256(path): path for path in forbidden}
    for path in sources:
        digest = _sha256(path)
        if digest in taken:
            raise SystemExit(f"{path} has the same bytes as {taken[digest]}: the held-out "
                             "benchmark must be disjoint from the demo and training photos")
        taken[digest] = path


def _open(path: Path, backdrop: tuple[int, int, int]) -> Image.Image:
    """The photo in RGB; a transparent part shows `backdrop`."""
    with Image.open(path) as image:
        rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*backdrop, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def content_box(image: Image.Image) -> Box | None:
    """Where the object is when a photo shows it on a flat backdrop (a cut-out stamp, a figure
    on black): the box of pixels unlike the top-left one. None when that is most of the
    photo, so that parts and zoom-ins land on the object, not on the backdrop."""
    backdrop = Image.new("RGB", image.size, image.getpixel((0, 0)))
    mask = ImageChops.difference(image, backdrop).convert("L").point(lambda v: 255 * (v > 24))
    box = mask.getbbox()
    if box is None or (box[2] - box[0]) * (box[3] - box[1]) > 0.85 * image.width * image.height:
        return None
    return tuple(float(v) for v in box)


def relight(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A strong light change: a dark or a washed-out exposure (gamma 1.8-2.6 or 0.35-0.55),
    a colour cast of up to 30% per channel, then a hue shift half of the time."""
    gamma = rng.uniform(1.8, 2.6) if rng.random() < 0.5 else rng.uniform(0.35, 0.55)
    pixels = (np.asarray(image, dtype=np.float64) / 255.0) ** gamma
    pixels = pixels * rng.uniform(0.7, 1.3, size=3)
    lit = Image.fromarray(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return shift_hue(lit, rng) if rng.random() < 0.5 else lit


@dataclass
class HardViews(Views):
    """The demo's view makers plus harder ones; `others` are the landscapes pasted into."""

    def part(self, rng: np.random.Generator) -> Image.Image:
        """The most textured of four random 5-15% crops: a patch of blank sky or wall is
        no view of anything."""
        crops = [crop_fraction(self.image, rng.uniform(0.05, 0.15), rng, self.region)
                 for _ in range(4)]
        view = max(crops, key=lambda crop: float(np.asarray(crop.convert("L")).std()))
        return fit(jitter_colour(view, rng, 0.25), VIEW_SIDE)

    def _pasted(
        self, rng: np.random.Generator, area: tuple[float, float], strong: bool
    ) -> Image.Image:
        piece = crop_fraction(self.image, rng.uniform(0.5, 0.9), rng, self.region)
        piece = warp_perspective(piece, rng, (0.1, 0.3) if strong else (0.05, 0.2))
        piece = relight(piece, rng) if strong else jitter_colour(piece, rng, 0.2)
        scene = fit(self.others[int(rng.integers(len(self.others)))], VIEW_SIDE)
        scene = jitter_colour(scene, rng, 0.2)
        size, corner = random_box(scene, piece, area, 0.8, rng)
        scene.paste(piece.resize(size, Image.Resampling.LANCZOS), corner)
        return scene

    def small_inset(self, rng: np.random.Generator) -> Image.Image:
        return self._pasted(rng, (0.05, 0.12), strong=False)

    def warped_inset(self, rng: np.random.Generator) -> Image.Image:
        return self._pasted(rng, (0.15, 0.25), strong=True)

    def strong_perspective(self, rng: np.random.Generator) -> Image.Image:
        view = warp_perspective(self.image, rng, (0.15, 0.35))
        return fit(jitter_colour(view, rng, 0.3), VIEW_SIDE)

    def relit(self, rng: np.random.Generator) -> Image.Image:
        return fit(relight(crop_fraction(self.image, rng.uniform(0.6, 0.9), rng), rng), VIEW_SIDE)

    def turned(self, rng: np.random.Generator) -> Image.Image:
        degrees = rng.uniform(25, 40) * rng.choice([-1, 1])
        return fit(jitter_colour(rotate_inside(self.image, degrees), rng, 0.25), VIEW_SIDE)


def query_views(
    q: int,
    photo: Image.Image,
    second: Image.Image | None,
    related: list[Image.Image],
    landscapes: list[Image.Image],
) -> list[GalleryImage]:
    """1 easy; 6 hard (part, small inset, warped inset, strong perspective, relit, and the
    real second view or a turn or an occlusion); 1 junk view plus the related photos."""
    views = HardViews(photo, content_box(photo), landscapes)
    rng = np.random.default_rng([SEED, q])
    hard = [views.part, views.small_inset, views.warped_inset, views.strong_perspective,
            views.relit]
    out = [GalleryImage(views.easy(rng), q, "easy")]
    out += [GalleryImage(make(rng), q, "hard") for make in hard]
    if second is not None:
        out.append(GalleryImage(fit(second, VIEW_SIDE), q, "hard"))
    else:
        fallback = views.turned if rng.random() < 0.5 else views.occlude
        out.append(GalleryImage(fallback(rng), q, "hard"))
    out.append(GalleryImage(views.junk(rng, tiny=q % 2 == 0), q, "junk"))
    out += [GalleryImage(fit(image, VIEW_SIDE), q, "junk") for image in related]
    return out


def distractor_views(
    index: int, photo: Image.Image, landscapes: list[Image.Image]
) -> list[GalleryImage]:
    """The photo, an easy view and one hard view of it: look-alikes that no query owns."""
    views = HardViews(photo, content_box(photo), landscapes)
    rng = np.random.default_rng([SEED, 1000 + index])
    makers = [views.part, views.strong_perspective, views.relit, views.small_inset]
    hard = makers[int(rng.integers(len(makers)))]
    return [GalleryImage(v, None, "distractor")
            for v in (fit(photo, VIEW_SIDE), views.easy(rng), hard(rng))]


def _backdrop(name: str) -> tuple[int, int, int]:
    return SKY_BACKDROP if name.startswith(LAND) else OBJECT_BACKDROP


def build(sources: Path, out: Path, opencv_data: Path, wallpapers: Path) -> dict:
    """Check the sources, make every view and write the benchmark (atomically) to `out`."""
    files = heldout_sources(sources)
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise SystemExit(f"missing source photos (unpack the packages into --sources?): "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    demo = make_demo.demo_sources(opencv_data)
    if not all(p.is_file() for p in demo):
        raise SystemExit(f"the demo sources are needed to check disjointness: {opencv_data} "
                         "lacks some (install or unpack opencv-doc, see --opencv-data)")
    if not collect_training_photos.wallpaper_photos(wallpapers):
        raise SystemExit(f"no training wallpapers under {wallpapers}: unpack ukui-wallpapers, "
                         "lomiri-wallpapers-16.04/20.04 and mate-backgrounds there")
    training = [path for _, path in collect_training_photos.training_sources(wallpapers)]
    check_disjoint(files, demo + training)

    def load(name: str) -> Image.Image:
        return _open(sources / name, _backdrop(name))

    landscapes = [load(name) for name in LANDSCAPES]
    gallery: list[GalleryImage] = []
    queries: list[tuple[Image.Image, Box]] = []
    for q, source in enumerate(QUERIES):
        photo = load(source.path)
        second = load(source.second) if source.second else None
        gallery += query_views(q, photo, second, [load(r) for r in source.related], landscapes)
        queries.append(make_demo.query_image(photo, content_box(photo)))
    for i, name in enumerate(DISTRACTORS):
        gallery += distractor_views(i, load(name), landscapes)
    gallery += [GalleryImage(fit(image, VIEW_SIDE), None, "distractor") for image in landscapes]
    return make_demo.write_benchmark(gallery, queries, out, SEED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=Path, required=True,
                        help="folder where the six Debian packages were unpacked (dpkg -x)")
    parser.add_argument("--wallpapers", type=Path, required=True,
                        help="folder where the training wallpaper packages were unpacked, to "
                             "check disjointness from training")
    parser.add_argument("--opencv-data", type=Path, default=make_demo.OPENCV_DATA,
                        help="OpenCV sample data (opencv-doc), to check disjointness from the demo")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"benchmark folder; its name is the dataset's (default {DEFAULT_OUT})")
    args = parser.parse_args()
    gnd = build(args.sources, args.out, args.opencv_data, args.wallpapers)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    hard = sum(len(g["hard"]) for g in gnd["gnd"])
    print(f"wrote {args.out}: {len(gnd['qimlist'])} queries, {len(gnd['imlist'])} gallery "
          f"images ({hard} hard positives), {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
