"""batches_by_shape: the one grouping of items by shape, for extraction and training."""

from elvis_cli.util.batching import batches_by_shape


def indices(items, batch_size, max_pending=None):
    return [[index for _, index in batch]
            for batch in batches_by_shape(items, lambda item: item[0], batch_size, max_pending)]


def test_full_batches_go_at_once_and_the_rest_at_the_end_in_the_order_shapes_reopened():
    items = [("a", 0), ("b", 1), ("a", 2), ("a", 3), ("c", 4)]
    # "a" is full at 2 and reopens at 3, after "b": the rest go as b, a, c
    assert indices(items, 2) == [[0, 2], [1], [3], [4]]


def test_the_cap_hands_over_the_largest_waiting_group_first_among_ties():
    items = [("a", 0), ("a", 1), ("b", 2), ("c", 3), ("a", 4)]
    # at most 3 waiting: the 4th item overflows and "a" (2 waiting) goes early
    assert indices(items, 4, max_pending=3) == [[0, 1], [2], [3], [4]]
    # two groups of one each, cap 1: the first opened goes
    assert indices([("b", 0), ("a", 1)], 4, max_pending=1) == [[0], [1]]


def test_a_cap_of_zero_hands_over_every_item_before_the_next_is_read():
    read = []

    def stream():
        for index in range(4):
            read.append(index)
            yield ("a" if index % 2 else "b", index)

    for batch in batches_by_shape(stream(), lambda item: item[0], 8, max_pending=0):
        assert [index for _, index in batch] == [read[-1]]
