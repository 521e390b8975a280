import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from elvis_cli.evaluation.metrics import (
    PROTOCOLS,
    average_precisions,
    class_scores,
    compute_ap,
    gldv2_scores,
    ok_junk_scores,
    protocol_junk,
    protocols_of,
    ranked_hits,
    recall,
    revisitop_map,
    revisitop_scores,
)
from elvis_cli.model.reranker import Fusion
from elvis_cli.util.errors import InputError


def test_compute_ap_trapezoids_by_hand():
    # 2 positives at ranks 0 and 2; each recall step is 1/2 wide:
    #   rank 0: precision before = 1 (by convention), after = 1/1 -> (1 + 1)/2 * 1/2 = 1/2
    #   rank 2: before = 1/2, after = 2/3                          -> (1/2 + 2/3)/2 * 1/2 = 7/24
    assert compute_ap(np.array([0, 2]), 2) == pytest.approx(1 / 2 + 7 / 24)
    # 1 positive at rank 1: before = 0/1, after = 1/2 -> (0 + 1/2)/2 = 1/4
    assert compute_ap(np.array([1]), 1) == pytest.approx(0.25)
    # 3 positives, only one retrieved, at rank 0: (1 + 1)/2 * 1/3
    assert compute_ap(np.array([0]), 3) == pytest.approx(1 / 3)
    # nothing retrieved
    assert compute_ap(np.array([], dtype=np.int64), 2) == 0.0
    with pytest.raises(ValueError):
        compute_ap(np.array([0]), 0)


@given(st.sets(st.integers(0, 60), min_size=1, max_size=15), st.integers(0, 5))
def test_compute_ap_is_one_only_for_a_perfect_ranking(ranks, missing):
    ranks = np.array(sorted(ranks))
    ap = compute_ap(ranks, len(ranks) + missing)
    assert 0.0 < ap <= 1.0 + 1e-12
    perfect = missing == 0 and ranks[-1] == len(ranks) - 1
    assert (ap == pytest.approx(1.0)) == perfect


GND = [
    {"easy": [0], "hard": [3], "junk": [1]},
    {"easy": [], "hard": [], "junk": [2]},  # no positive at all: skipped by both protocols
]


def test_revisitop_medium_and_hard_by_hand():
    ranking = np.array([[1, 0, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]])
    # Medium: positives {0, 3}, junk {1}. Without junk: [0, 2, 3, 4, 5] -> positives at 0 and 2,
    # AP = 1/2 + 7/24 = 19/24 (see above).
    medium = revisitop_map(ranking, GND, "medium")
    assert medium["map"] == pytest.approx(100 * 19 / 24)
    assert np.isnan(medium["aps"][1])
    # Hard: positives {3}, junk {1, 0}. Without junk: [2, 3, 4, 5] -> positive at 1, AP = 1/4.
    assert revisitop_map(ranking, GND, "hard")["map"] == pytest.approx(25.0)
    scores = revisitop_scores(ranking, ranking, GND)
    assert scores == pytest.approx(
        {"map_medium": 100 * 19 / 24, "map_hard": 25.0, "map": (100 * 19 / 24 + 25) / 2}
    )


def test_revisitop_scores_take_a_ranking_per_protocol():
    medium_ranking = np.array([[1, 0, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]])
    hard_ranking = np.array([[3, 1, 0, 2, 4, 5], [0, 1, 2, 3, 4, 5]])  # hard positive first
    scores = revisitop_scores(medium_ranking, hard_ranking, GND)
    assert scores["map_medium"] == pytest.approx(100 * 19 / 24)
    assert scores["map_hard"] == pytest.approx(100.0)


def test_short_ranking_counts_missing_positives_as_never_retrieved():
    gnd = [{"easy": [5], "hard": [4], "junk": []}]
    ranking = np.array([[4, 0]])  # a shortlist of 2 out of a gallery of 6
    # Medium: 2 positives, only 4 found at rank 0 -> (1 + 1)/2 * 1/2 = 1/2
    assert revisitop_map(ranking, gnd, "medium")["map"] == pytest.approx(50.0)
    # Hard: positives {4} (5 is easy, hence junk) -> rank 0 -> 1
    assert revisitop_map(ranking, gnd, "hard")["map"] == pytest.approx(100.0)


def test_ranking_longer_than_the_gallery_with_extra_distractors():
    # indices 6.. are distractors beyond imlist (the +R1M setting)
    ranking = np.array([[6, 0, 7, 3, 8, 1]])
    gnd = [{"easy": [0], "hard": [3], "junk": [1]}]
    # Medium: positives at 1 and 3 (junk 1 comes after them):
    #   rank 1: (0/1 + 1/2)/2 * 1/2 = 1/8;  rank 3: (1/3 + 2/4)/2 * 1/2 = 5/24  -> 1/3
    assert revisitop_map(ranking, gnd, "medium")["map"] == pytest.approx(100 / 3)


def test_junk_everywhere():
    gnd = [{"easy": [], "hard": [0], "junk": [1, 2, 3, 4, 5]}]
    # all junk ahead of the positive is removed -> rank 0
    assert revisitop_map(np.array([[1, 2, 3, 4, 5, 0]]), gnd, "medium")["map"] == 100.0
    # a ranking of nothing but junk retrieves no positive
    assert revisitop_map(np.array([[1, 2]]), gnd, "medium")["map"] == 0.0


def test_no_query_with_positives_and_bad_shapes_are_input_errors():
    with pytest.raises(InputError, match="no query has a positive"):
        revisitop_map(np.array([[0, 1]]), [{"easy": [], "hard": [], "junk": [0]}])
    with pytest.raises(InputError, match="shape"):
        revisitop_map(np.array([0, 1, 2]), GND)
    with pytest.raises(InputError, match="shape"):
        revisitop_map(np.zeros((3, 4)), GND)


def test_protocol_junk():
    entry = {"easy": [1, 2], "hard": [3], "junk": [4]}
    positives, junk = protocol_junk(entry, "medium")
    assert sorted(positives) == [1, 2, 3] and list(junk) == [4]
    positives, junk = protocol_junk(entry, "hard")
    assert list(positives) == [3] and sorted(junk) == [1, 2, 4]
    positives, junk = protocol_junk({"ok": [7, 8]}, "ok")
    assert list(positives) == [7, 8] and junk.size == 0
    with pytest.raises(InputError, match="unknown protocol 'easy'"):
        protocol_junk(entry, "easy")
    with pytest.raises(InputError, match="'ok'"):
        protocol_junk(entry, "ok")


def ok_map(ranking, positives, junk=None, k=100):
    """The headline mAP of ok/junk scoring (no junk: none)."""
    junk = [[] for _ in positives] if junk is None else junk
    return ok_junk_scores(ranking, positives, junk, map_k=k)["map"]


def recall_at(ranking, positives, k, junk=None, map_k=None):
    """recall@k as the scorers read it, on the cut list with its junk removed."""
    return recall(ranked_hits(ranking, positives, junk, map_k), k)


def test_every_kind_of_ground_truth_has_its_protocols():
    assert protocols_of("revisitop") == ("medium", "hard")
    assert all(protocols_of(kind) == ("ok",) for kind in ("ok-junk", "class", "gldv2"))
    assert set(PROTOCOLS) == {"revisitop", "ok-junk", "class", "gldv2"}
    with pytest.raises(InputError, match="unknown kind of ground truth 'medium'"):
        protocols_of("medium")


def test_ok_junk_map_by_hand():
    ranking = np.array([[0, 1, 2, 3, 4]])
    # hits at ranks 0 and 3: precisions 1/1 and 2/4 -> (1 + 1/2) / min(2, 100) = 3/4
    assert ok_map(ranking, [[0, 3]]) == pytest.approx(75.0)
    # junk 1 removed: [0, 2, 3, 4] -> hits at 0 and 2: (1 + 2/3) / 2 = 5/6
    assert ok_map(ranking, [[0, 3]], junk=[[1]]) == pytest.approx(100 * 5 / 6)
    # top 2 only: [0, 1] -> one hit at 0: 1 / min(2, 2) = 1/2
    assert ok_map(ranking, [[0, 3]], k=2) == pytest.approx(50.0)
    # 3 positives but k = 2: normalised by 2, both top slots are hits -> 1
    assert ok_map(ranking, [[0, 1, 2]], k=2) == pytest.approx(100.0)
    # k=None: the whole ranking, normalised by all 3 positives; 9 never retrieved
    # hits at 0 and 3 -> (1 + 2/4) / 3 = 1/2
    assert ok_map(ranking, [[0, 3, 9]], k=None) == pytest.approx(50.0)


def test_ok_junk_map_skips_queries_without_positives():
    ranking = np.array([[0, 1], [1, 0]])
    # query 0: hit at rank 1 -> (1/2) / 1
    assert ok_map(ranking, [[1], []]) == pytest.approx(50.0)
    assert np.isnan(average_precisions(ranked_hits(ranking, [[1], []], None, 100))[1])


def test_recall_by_hand():
    ranking = np.array([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]])
    positives = [[3], [0], []]  # the third query has none and is skipped
    assert recall_at(ranking, positives, 1) == pytest.approx(50.0)
    assert recall_at(ranking, positives, 3) == pytest.approx(50.0)
    assert recall_at(ranking, positives, 4) == pytest.approx(100.0)
    # removing junk 1 and 2 moves query 0's positive to rank 1
    assert recall_at(ranking, positives, 2, junk=[[1, 2], [], []]) == pytest.approx(100.0)


# --- edge cases of every scoring rule (ELVIS_SPEC §6) ---------------------------------------------


def test_revisitop_query_without_hard_positive_is_skipped_only_in_hard():
    gnd = [{"easy": [0], "hard": [], "junk": []}, {"easy": [], "hard": [1], "junk": []}]
    ranking = np.array([[1, 0], [0, 1]])
    # Medium: q0 positive at rank 1 -> (0 + 1/2)/2 = 25; q1 at rank 1 -> 25
    assert revisitop_map(ranking, gnd, "medium")["map"] == pytest.approx(25.0)
    hard = revisitop_map(ranking, gnd, "hard")
    assert np.isnan(hard["aps"][0]) and hard["map"] == pytest.approx(25.0)


def test_revisitop_all_junk_ranking_scores_zero():
    # every retrieved image is junk: after removal nothing is left, the positive is never found
    gnd = [{"easy": [3], "hard": [], "junk": [0, 1, 2]}]
    assert revisitop_map(np.array([[0, 1, 2]]), gnd, "medium")["map"] == 0.0
    # and with the positive last, it moves to rank 0 once junk is gone -> AP 100
    assert revisitop_map(np.array([[0, 1, 2, 3]]), gnd, "medium")["map"] == pytest.approx(100.0)


def test_ok_junk_map_with_k_beyond_the_gallery_and_a_short_shortlist():
    # 3-image gallery, k = 100: positives at ranks 0 and 2 -> (1 + 2/3) / min(2, 100)
    assert ok_map(np.array([[4, 1, 7]]), [[4, 7]], k=100) == pytest.approx(100 * 5 / 6)
    # a shortlist of 2 for 3 positives, one found at rank 1: the authors' compute_map divides by
    # min(#positives, length of the cut list) = min(3, 2) -> (1/2) / 2
    assert ok_map(np.array([[0, 5]]), [[5, 8, 9]], k=100) == pytest.approx(25.0)
    # recall@5 on a 2-long list: the positive at rank 1 counts
    assert recall_at(np.array([[0, 5]]), [[5]], 5) == pytest.approx(100.0)


def test_gldv2_scores_the_private_split_as_the_headline():
    queries = 752
    ranking = np.tile(np.arange(4), (queries, 1))
    positives = [[0]] * (queries - 750) + [[1]] * 749 + [[]]  # the very last query has none
    splits = {"public": np.arange(2), "private": np.arange(2, queries)}
    scores = gldv2_scores(ranking, positives, None, splits)
    assert scores["map_public"] == pytest.approx(100.0)  # hits at rank 0
    assert scores["map"] == pytest.approx(50.0)  # private, the headline: hits at rank 1: 1/2
    assert scores["map_all"] == pytest.approx((2 * 100 + 749 * 50) / 751)
    small = gldv2_scores(ranking[:3], positives[:3], None,
                         {"public": np.arange(0), "private": np.arange(3)})  # all private
    assert np.isnan(small["map_public"])
    assert small["map"] == pytest.approx((100 + 100 + 50) / 3)
    # the cut to 100 comes first: a private query whose positive is 101st scores 0, whatever
    # junk precedes it
    long = np.tile(np.arange(200), (2, 1))
    cut = gldv2_scores(long, [[0], [100]], [[], list(range(1, 100))],
                       {"public": np.array([0]), "private": np.array([1])})
    assert cut == {"map": 0.0, "map_public": 100.0, "map_all": 50.0}
    with pytest.raises(InputError, match="private split"):
        gldv2_scores(long, [[0], [100]], None, {})


def test_class_labelled_sets_by_hand():
    # class labels a a b a b: each image is a query and a gallery row
    # SOP/RP2K: every image is a query and in the gallery; each ranking starts with itself
    ranking = np.array([[0, 2, 1, 4, 3], [1, 0, 3, 2, 4], [2, 4, 0, 1, 3],
                        [3, 2, 4, 0, 1], [4, 0, 2, 1, 3]])
    # positives: the other images of the query's class; its own row is taken out
    positives, own_rows = [[1, 3], [0, 3], [4], [0, 1], [2]], [[q] for q in range(5)]
    scores = class_scores(ranking, positives, own_rows)
    # without self: q0 [2 1 4 3] hits at 1, 3 -> (1/2 + 2/4)/2 = 1/2; q1 [0 3 2 4] -> 1;
    # q2 [4 0 1 3] -> 1; q3 [2 4 0 1] hits at 2, 3 -> (1/3 + 2/4)/2 = 5/12; q4 [0 2 1 3] -> 1/2
    assert scores["map"] == pytest.approx(100 * (1 / 2 + 1 + 1 + 5 / 12 + 1 / 2) / 5)
    assert scores["recall@1"] == pytest.approx(40.0) and scores["recall@5"] == 100.0
    # AP@5 is the same sum over the top 5 / min(5, #positives): the lists are shorter than 5
    assert scores["ap@5"] == pytest.approx(scores["map"])
    # MET: queries apart from the gallery; AP normalised by the class size, a distractor
    # query (no class in the gallery) is skipped
    # ("b": the gallery's 2 and 4; "z": none)
    met = class_scores(np.array([[2, 0, 1, 3, 4], [0, 1, 2, 3, 4]]), [[2, 4], []], [[], []])
    assert met["map"] == pytest.approx(100 * (1 + 2 / 5) / 2)


def test_ties_in_the_fused_score_keep_the_global_order():
    from elvis_cli.model.reranker import fuse_and_sort

    indices = np.array([[7, 3, 5, 1]])
    global_scores = np.array([[0.9, 0.9, 0.9, 0.1]], dtype=np.float32)
    raw = np.array([[2.0, 2.0, 2.0, 50.0]], dtype=np.float32)
    result = fuse_and_sort(indices, global_scores, raw, 3, Fusion(0.5, 0.5))
    np.testing.assert_array_equal(result.indices, [[7, 3, 5, 1]])  # tied head, untouched tail


# --- the order of the cut and of junk removal (compute_metrics, then compute_map) ------------


def test_the_list_is_cut_to_map_k_before_junk_is_removed():
    ranking = np.array([[10, 11, 0, 1, 12]])
    positives, junk = [[0, 1]], [[10, 11]]
    # cut to 3: [10 11 0] -> junk out: [0] -> one hit at 0, / min(2 positives, 3 listed) = 1/2
    # (junk out first would give [0 1 12] and AP 1)
    assert ok_map(ranking, positives, junk, k=3) == pytest.approx(50.0)
    # cut to 2: only junk is left, no positive is found at all
    assert recall_at(ranking, positives, 2, junk, map_k=2) == 0.0
    # recall@k is read on the positions left once junk is out of the cut list
    assert recall_at(ranking, positives, 1, junk, map_k=100) == pytest.approx(100.0)


def test_ok_junk_scores_report_the_authors_recalls():
    # 60 junk images, then negatives; the positive is 121st: beyond the cut to 100, so it counts
    # nowhere, although it would be 61st once junk is out
    row = np.concatenate([np.arange(100, 160), np.arange(1000, 1060), [7]])
    ranking = np.stack([row, np.roll(row, 1)])  # query 1 has its positive first
    scores = ok_junk_scores(ranking, [[7], [7]], [np.arange(100, 160)] * 2)
    assert scores == {"map": pytest.approx(50.0), "recall@1": pytest.approx(50.0),
                      "recall@10": pytest.approx(50.0), "recall@100": pytest.approx(50.0)}


def test_class_ap_over_the_top_100_with_more_than_100_positives():
    # query 0 is gallery row 0; its class has 121 images, so 120 positives (SOP: class size - 1).
    # Its list: itself first, then positives and negatives alternating.
    positives = np.arange(1, 121)
    negatives = np.arange(1000, 1120)
    row = np.concatenate([[0], np.stack([positives, negatives], axis=1).reshape(-1)])
    scores = class_scores(row[None], [positives], [[0]])
    # without itself: hits at 0, 2, 4, ...; the top 100 holds 50, the i-th at position 2i has
    # precision (i + 1) / (2i + 1); / min(100, 120)
    expected = sum((i + 1) / (2 * i + 1) for i in range(50)) / 100
    assert scores["map"] == pytest.approx(100 * expected)
    # AP@5: hits at 0, 2, 4 -> (1 + 2/3 + 3/5) / min(5, 120)
    assert scores["ap@5"] == pytest.approx(100 * (1 + 2 / 3 + 3 / 5) / 5)
    assert scores["recall@1"] == 100.0 and scores["recall@5"] == 100.0


def test_class_ap_with_fewer_positives_and_the_query_taking_no_slot():
    # MET-like query (not in the gallery), 3 positives: hits at 1 and 3 of the top 100, a third
    # at 150 lies beyond the cut -> (1/2 + 2/4) / min(100, 3)
    row = np.arange(1000, 1200)
    row[[1, 3, 150]] = [7, 8, 9]
    scores = class_scores(row[None], [[7, 8, 9]], [[]])
    assert scores["map"] == pytest.approx(100 * (1 / 2 + 2 / 4) / 3)
    assert scores["ap@5"] == pytest.approx(100 * (1 / 2 + 2 / 4) / 3)
    assert scores["recall@1"] == 0.0 and scores["recall@5"] == 100.0
    # SOP-like: the query (row 5) sits 51st and a positive 101st; with the query taken out the
    # positive is 100th, inside the cut, and the query itself is no hit
    row = np.arange(1000, 1200)
    row[50], row[100] = 5, 7
    scores = class_scores(row[None], [[7]], [[5]])
    assert scores["map"] == pytest.approx(100 * (1 / 100))
    assert scores["ap@5"] == 0.0 and scores["recall@5"] == 0.0
