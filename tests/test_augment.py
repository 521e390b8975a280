import numpy as np
import pytest
from skimage import data

from elvis_cli.training.augment import ViewConfig, inset_view, random_view

IDENTITY = ViewConfig(
    crop_area=(1.0, 1.0), aspect_jitter=0.0, perspective_prob=0.0, rotation_prob=0.0,
    scale=(1.0, 1.0), max_side=None, colour_prob=0.0, blur_prob=0.0, occlusion_prob=0.0,
)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return data.astronaut()[::2, ::2].copy()  # 256 x 256 x 3 uint8


def test_view_is_uint8_rgb_with_the_configured_longer_side(photo):
    config = ViewConfig(scale=(1.0, 1.0), max_side=200)
    for seed in range(5):
        view = random_view(photo, np.random.default_rng(seed), config)
        assert view.dtype == np.uint8
        assert view.ndim == 3 and view.shape[2] == 3
        # rotation may trim a little; the longer side is otherwise the configured one
        assert 120 <= max(view.shape[:2]) <= 200


def test_same_seed_gives_the_same_view(photo):
    first = random_view(photo, np.random.default_rng(7))
    second = random_view(photo, np.random.default_rng(7))
    np.testing.assert_array_equal(first, second)


def test_different_seeds_give_different_views(photo):
    views = [random_view(photo, np.random.default_rng(seed)) for seed in range(4)]
    for i in range(len(views)):
        for j in range(i + 1, len(views)):
            assert views[i].shape != views[j].shape or not np.array_equal(views[i], views[j])


def test_zero_strength_returns_the_input(photo):
    view = random_view(photo, np.random.default_rng(0), IDENTITY)
    np.testing.assert_array_equal(view, photo)


@pytest.mark.parametrize(
    "change",
    [
        {"perspective_prob": 1.0},
        {"rotation_prob": 1.0},
        {"colour_prob": 1.0},
        {"blur_prob": 1.0},
        {"occlusion_prob": 1.0},
    ],
)
def test_each_transform_alone_keeps_the_view_close_to_the_photo(photo, change):
    """One transform changes the photo, but not into something unrelated to it."""
    config = ViewConfig(**{**IDENTITY.__dict__, **change})
    view = random_view(photo, np.random.default_rng(3), config)
    assert not np.array_equal(view, photo)
    if view.shape == photo.shape:
        reference = photo.astype(np.float64).ravel()
        correlation = np.corrcoef(reference, view.astype(np.float64).ravel())[0, 1]
        assert correlation > 0.3


def test_inset_covers_the_drawn_fraction_of_the_backdrop():
    view = np.full((60, 80, 3), 255, dtype=np.uint8)
    backdrop = np.zeros((200, 300, 3), dtype=np.uint8)
    for seed in range(5):
        out = inset_view(view, backdrop, np.random.default_rng(seed), (0.2, 0.3))
        assert out.shape == view.shape and out.dtype == np.uint8
        covered = (out == 255).all(axis=2).mean()
        assert 0.18 <= covered <= 0.32
        assert (out == 0).all(axis=2).mean() == pytest.approx(1 - covered)
