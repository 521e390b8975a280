import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from elvis_cli.backbones import create_backbone
from elvis_cli.features.images import collect_images
from elvis_cli.model.checkpoints import load_checkpoint
from elvis_cli.model.elvis import Elvis, ElvisConfig, uses_log_domain
from elvis_cli.training.augment import ViewConfig, render_views
from elvis_cli.training.config import TrainConfig
from elvis_cli.training.initialisation import calibrate_logit, init_vote_counting
from elvis_cli.training.loop import train
from elvis_cli.training.pairs import PairSampler
from elvis_cli.training.photos import photo_set, read_labels, split_by_instance
from elvis_cli.training.pool import extract_pool, raw_scores
from elvis_cli.training.run import _schedule, _train_step
from elvis_cli.training.validation import FUSION_GRID, ValidationSet
from elvis_cli.util.errors import InputError

BACKBONE_OPTIONS = {"image_size": 192, "num_local": 32}
SMALL_VIEWS = ViewConfig(max_side=192, inset_prob=0.5)
CPU = torch.device("cpu")


SMALL_RUN = {
    "backbone_options": BACKBONE_OPTIONS, "views_per_image": 3, "rounds": 2,
    "steps_per_round": 4, "batch_pairs": 8, "val_pairs": 32, "views": SMALL_VIEWS,
    "device": "cpu",
}


def _small_config(**changes) -> TrainConfig:
    return TrainConfig(**{**SMALL_RUN, **changes})


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Seven real photos as JPEGs, decoded later by the real loader."""
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field",
                 "immunohistochemistry"):
        image = getattr(data, name)()
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        Image.fromarray(image).save(folder / f"{name}.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("efficientnet-lite0", **BACKBONE_OPTIONS).eval()


@pytest.fixture(scope="module")
def trained(photos, tmp_path_factory):
    """The same small run twice, to check the checkpoint and determinism together."""
    out = tmp_path_factory.mktemp("runs")
    first = train(photos, out / "a.pt", _small_config(), progress=False)
    second = train(photos, out / "b.pt", _small_config(), progress=False)
    return first, second


def test_checkpoint_loads_with_fusion_backbone_and_record(trained, backbone):
    report = trained[0]
    checkpoint = load_checkpoint(report.checkpoint)
    assert checkpoint.backbone["name"] == "efficientnet-lite0"
    assert checkpoint.backbone["num_local"] == 32
    assert checkpoint.descriptor_dim == backbone.local_dim
    assert (checkpoint.fusion.lam, checkpoint.fusion.temperature) in FUSION_GRID
    assert checkpoint.fusion == report.fusion
    info = checkpoint.info
    assert info["rounds"] == 2 and info["steps_per_round"] == 4 and info["seed"] == 0
    assert info["photos"] + info["val_photos"] == 7
    assert len(info["fusion_grid"]) == len(FUSION_GRID) == 18
    assert info["best_round"] == report.best_round
    assert [entry["round"] for entry in report.history] == [1, 2]
    best = report.history[report.best_round - 1]
    assert best["val_map"] == max(entry["val_map"] for entry in report.history)
    assert best["val_map"] == max(point["val_map"] for point in report.fusion_grid)
    for entry in report.history:
        assert math.isfinite(entry["loss"]) and entry["skipped_steps"] == 0


def test_training_is_deterministic_for_a_seed(trained):
    first, second = trained
    assert first.history == second.history
    a = load_checkpoint(first.checkpoint).model.state_dict()
    b = load_checkpoint(second.checkpoint).model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_vote_counting_init_is_the_closed_form():
    model = Elvis(ElvisConfig(descriptor_dim=8))
    init_vote_counting(model, threshold=0.1, width=0.05, amplitude=3.0)
    votes = torch.linspace(0.0, 0.5, 21)
    t = (votes - 0.1) / 0.05
    expected = 3.0 * t / torch.sqrt(1 + t**2)
    with torch.no_grad():
        torch.testing.assert_close(model.f(votes[:, None]).squeeze(-1), expected, atol=1e-4,
                                   rtol=1e-4)
        raw = torch.tensor([3.0, 10.0, 20.0, 31.0])
        calibrate_logit(model, raw)
        torch.testing.assert_close(model.logit(raw), (raw - raw.mean()) / raw.std(), atol=1e-4,
                                   rtol=1e-4)


def test_loss_falls_on_a_fixed_pool(photos, backbone):
    paths = collect_images(photos)[1]
    pool_photos = photo_set(paths, None)
    views = render_views(pool_photos, 4, SMALL_VIEWS, [0, 0, 0], {})
    pool = extract_pool(backbone, views, pool_photos, 32, 8, CPU)
    assert len(pool) == 4 * len(paths)
    assert pool.local_desc.dtype == torch.float16
    assert pool.local_desc.shape[1:] == (32, backbone.local_dim)
    sampler = PairSampler(pool, 5)
    torch.manual_seed(0)
    model = Elvis(ElvisConfig(descriptor_dim=backbone.local_dim))
    init_vote_counting(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    fixed = sampler.sample(np.random.default_rng(1), 16, 16, 0.5)
    calibrate_logit(model, torch.from_numpy(raw_scores(model, pool, fixed[0], fixed[1], CPU)))

    def fixed_loss() -> float:
        raw = torch.from_numpy(raw_scores(model, pool, fixed[0], fixed[1], CPU))
        with torch.no_grad():
            logits = model.logit(raw)
        return float(torch.nn.functional.binary_cross_entropy_with_logits(
            logits, torch.from_numpy(fixed[2])))

    before = fixed_loss()
    model.train()
    for _ in range(50):  # RootSIFT's 32 keypoints of small views: slower to fit than the grid
        assert _train_step(model, optimizer, pool, sampler.sample(rng, 8, 8, 0.5), CPU, 5.0)
    assert fixed_loss() < 0.7 * before


def test_pairs_are_what_they_claim(photos, backbone):
    pool_photos = photo_set(collect_images(photos)[1], None)
    pool = extract_pool(backbone, render_views(pool_photos, 3, SMALL_VIEWS, [1], {}),
                        pool_photos, 32, 8, CPU)
    src, tgt, labels = PairSampler(pool, 4).sample(np.random.default_rng(0), 20, 20, 0.5)
    same = pool.instance[src] == pool.instance[tgt]
    np.testing.assert_array_equal(same, labels == 1)
    assert np.all(src != tgt)
    # a view pasted into another photo is never a negative of that photo's views
    assert (pool.backdrop >= 0).any()
    assert not pool.related(src[labels == 0], tgt[labels == 0]).any()


def test_ranked_pairs_come_from_the_anchors_global_ranking(photos, backbone):
    pool_photos = photo_set(collect_images(photos)[1], None)
    pool = extract_pool(backbone, render_views(pool_photos, 3, SMALL_VIEWS, [1], {}),
                        pool_photos, 32, 8, CPU)
    src, tgt, labels = PairSampler(pool, 4).sample_ranked(np.random.default_rng(0), 30, 6)
    np.testing.assert_array_equal(labels, [1] * 30 + [0] * 30)
    np.testing.assert_array_equal(src[:30], src[30:])  # one positive and one negative per anchor
    np.testing.assert_array_equal(pool.instance[src] == pool.instance[tgt], labels == 1)
    assert not pool.related(src[labels == 0], tgt[labels == 0]).any()
    similarity = (pool.global_desc @ pool.global_desc.T).numpy()
    np.fill_diagonal(similarity, -np.inf)
    sixth = np.sort(similarity, axis=1)[:, -6]
    chosen = similarity[src, tgt]
    assert np.all(chosen >= sixth[src]) and np.all(chosen > 0)  # within the 6 nearest


def test_warm_up_then_cosine():
    """The authors' "warmcos": from a third of the rate up to it over the first tenth, then
    down along a cosine to zero."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=0.3)
    schedule = _schedule(optimizer, 100, 0.1)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(0.1) and rates[10] == pytest.approx(0.3)
    assert rates[5] == pytest.approx(0.2)
    assert rates[55] == pytest.approx(0.15)  # half-way down the cosine
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))


def test_the_authors_recipe_trains_and_is_recorded(photos, tmp_path):
    config = TrainConfig.for_recipe("authors", **{
        **SMALL_RUN, "descriptors_per_side": (8, 24), "rounds": 1})
    report = train(photos, tmp_path / "authors.pt", config, progress=False)
    info = load_checkpoint(report.checkpoint).info
    assert (info["sampling"], info["lr"], info["weight_decay"], info["warmup_fraction"]) == (
        "ranked", 5e-4, 5e-4, 0.1)
    assert list(info["descriptors_per_side"]) == [8, 24] and "ranked_candidates" in info
    assert math.isfinite(report.history[0]["loss"])
    with pytest.raises(InputError, match="recipe must be ours or authors, not 'theirs'"):
        TrainConfig.for_recipe("theirs")
    with pytest.raises(InputError, match="descriptors per side must be a range"):
        TrainConfig(descriptors_per_side=(50, 50))


def test_insets_record_their_backdrop_and_are_junk_in_validation(photos, backbone):
    pool_photos = photo_set(collect_images(photos)[1], None)
    views = list(render_views(pool_photos, 3, ViewConfig(max_side=192, inset_prob=1.0), [3], {}))
    # the first photo has no previous photo to be pasted into; each later one uses the previous
    assert [backdrop for _, _, backdrop in views] == [-1, -1, -1] + [
        b for photo in range(1, len(pool_photos.paths)) for b in (-1, photo - 1, photo - 1)]
    pool = extract_pool(backbone, iter(views), pool_photos, 32, 8, CPU)
    val = ValidationSet.build(pool, _small_config())
    inset = int(np.flatnonzero(pool.backdrop >= 0)[0])
    backdrop_views = np.flatnonzero(pool.instance == pool.backdrop[inset])
    assert set(backdrop_views) <= set(val.junk[inset])
    assert not set(val.junk[inset]) & set(val.positives[inset])


def test_labelled_csv_makes_cross_photo_positives(photos, tmp_path):
    """Two photos per instance (the photo and a mirrored crop of it), one view per photo."""
    folder = tmp_path / "labelled"
    folder.mkdir()
    rows = ["path,instance_id"]
    for index, source in enumerate(sorted(photos.glob("*.jpg"))):
        image = Image.open(source).convert("RGB")
        image.save(folder / f"{index}_a.jpg")
        width, height = image.size
        mirrored = image.crop((width // 10, 0, width, height)).transpose(Image.FLIP_LEFT_RIGHT)
        mirrored.save(folder / f"{index}_b.jpg")
        rows += [f"{index}_a.jpg,object{index}", f"{index}_b.jpg,object{index}"]
    labels = folder / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")

    label_map = read_labels(labels)
    assert len(label_map) == 14 and len(set(label_map.values())) == 7
    train_set, val_set = split_by_instance(photo_set(list(label_map), label_map), 0.2, 0)
    assert not set(train_set.instances) & set(val_set.instances)

    config = _small_config(views_per_image=1, rounds=1)
    report = train(None, tmp_path / "labelled.pt", config, labels=labels, progress=False)
    info = load_checkpoint(report.checkpoint).info
    assert info["labelled"] is True
    assert info["instances"] == 5 and info["photos"] == 10 and info["val_photos"] == 4


def test_self_supervised_needs_two_views(photos, tmp_path):
    with pytest.raises(InputError, match="single view"):
        train(photos, tmp_path / "x.pt", _small_config(views_per_image=1), progress=False)


def test_bad_labels_row_is_a_clear_error(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,instance_id\na.jpg,1\nb.jpg\n")
    with pytest.raises(InputError, match=r"labels.csv:3"):
        read_labels(labels)


def test_unreadable_photo_is_skipped_and_reported(photos, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for source in sorted(photos.glob("*.jpg"))[:5]:
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    report = train(folder, tmp_path / "m.pt", _small_config(rounds=1), val_source=photos,
                   progress=False)
    assert len(report.skipped) == 1 and "broken.jpg" in report.skipped[0]


def test_log_domain_fallback_trains_with_finite_gradients(photos, backbone):
    """A dustbin corner past the linear-domain range switches Sinkhorn to the log domain."""
    pool_photos = photo_set(collect_images(photos)[1], None)
    pool = extract_pool(backbone, render_views(pool_photos, 2, SMALL_VIEWS, [2], {}),
                        pool_photos, 32, 8, CPU)
    model = Elvis(ElvisConfig(descriptor_dim=backbone.local_dim))
    init_vote_counting(model)
    with torch.no_grad():
        model.dust_bin.fill_(8.0)
    assert uses_log_domain(model.dust_bin, model.config.regularisation)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pairs = PairSampler(pool, 4).sample(np.random.default_rng(0), 4, 4, 0.5)
    assert _train_step(model, optimizer, pool, pairs, CPU, 5.0) is not None
    assert all(torch.isfinite(p).all() for p in model.parameters())
