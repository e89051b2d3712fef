import torch

from service.engine import selection


def test_allocate_keeps_the_global_budget_and_a_floor_per_layer():
    composite = [torch.tensor([9.0, 8, 7, 6]), torch.tensor([5.0, 4, 3, 2]), torch.tensor([0.1, 0.0, 0, 0])]
    counts = selection.allocate(composite, compression_ratio=0.5, floor=1)
    assert counts == [4, 2, 1]  # top-6 of 12 are 4 + 2; the last layer gets the floor


def test_layer_zero_is_made_the_largest():
    c = selection.composite_scores([torch.tensor([[1.0, 0.0]]), torch.tensor([[5.0, 4.0]])], "mean", 0)
    assert c[0].tolist() == [5.0, 4.0]


def test_lower_bound_forces_slots_in_every_layer():
    scores = [torch.tensor([[1.0, 0.9, 0.8]]), torch.tensor([[0.01, 0.0, 0.0]])]
    composite = selection.composite_scores(scores, "mean", lower_bound=2)
    counts = selection.allocate(composite, compression_ratio=0.6, floor=2)
    assert counts[1] == 2


def test_select_gives_each_heads_best_positions_in_position_order():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.8, 0.1, 0.2, 0.9]])
    positions, padding = selection.select(scores, 2)
    assert positions.tolist() == [[1, 3], [0, 3]]
    assert padding is None


def test_select_with_unequal_counts_marks_padding_evicted():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.8, 0.1, 0.2, 0.9]])
    positions, padding = selection.select(scores, torch.tensor([3, 1]))
    assert positions[0].tolist() == [1, 2, 3]
    assert positions[1, 0].item() == 3 and padding[1].tolist() == [False, True, True]
    assert padding[0].tolist() == [False, False, False]


def test_group_scores_average_query_heads_of_a_kv_head():
    heads = torch.tensor([[1.0, 0.0], [3.0, 2.0], [10.0, 10.0], [0.0, 0.0]])
    assert selection.group_scores(heads, 2, "mean").tolist() == [[2.0, 1.0], [5.0, 5.0]]
    assert selection.group_scores(heads, 2, "max").tolist() == [[3.0, 2.0], [10.0, 10.0]]
