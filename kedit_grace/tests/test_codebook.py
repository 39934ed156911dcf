"""The deferral mechanism shared by GRACE and MELO, and GRACE's codebook rules."""

import torch

from kedit_grace.codebook import Carry, Growable, TailCache, route, route_positions
from kedit_grace.grace.codebook_update import update_codebook


def test_route_hits_within_radius_and_holds_for_the_rest_of_the_sequence():
    keys = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    radii = torch.tensor([1.0, 1.0])
    queries = torch.tensor([[[5.0, 5.0], [0.5, 0.0], [7.0, 7.0], [9.5, 0.0], [3.0, 3.0]]])
    active = route(queries, keys, radii, "euclidean")
    assert active.tolist() == [[-1, 0, 0, 1, 1]]


def test_route_far_queries_defer_and_mask_blocks_padding():
    keys = torch.tensor([[0.0, 0.0]])
    radii = torch.tensor([0.5])
    queries = torch.tensor([[[3.0, 0.0], [0.6, 0.0]], [[0.1, 0.0], [0.0, 0.0]]])
    assert route(queries, keys, radii, "euclidean").tolist() == [[-1, -1], [0, 0]]
    mask = torch.tensor([[1, 1], [0, 1]])
    assert route(queries, keys, radii, "euclidean", mask).tolist() == [[-1, -1], [-1, 0]]


def test_route_cosine_ignores_scale_and_empty_codebook_defers():
    keys = torch.tensor([[1.0, 0.0]])
    assert route(torch.tensor([[50.0, 1.0]]), keys, torch.tensor([0.1]), "cosine").tolist() == [0]
    assert route(torch.ones(1, 3, 2), torch.zeros(0, 2), torch.zeros(0), "euclidean").tolist() == [[-1, -1, -1]]


def test_route_spans_end_an_entry_after_its_answer():
    keys = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    radii = torch.tensor([1.0, 1.0])
    far = [5.0, 5.0]
    queries = torch.tensor([[far, [0.5, 0.0], far, far, far, [9.5, 0.0], far, [0.0, 0.0]]])
    spans = torch.tensor([3, 1])
    routing = route_positions(queries, keys, radii, "euclidean", spans=spans)
    assert routing.active.tolist() == [[-1, 0, 0, 0, -1, 1, -1, 0]]
    assert routing.left.tolist() == [[0, 2, 1, 0, 0, 0, 0, 2]]
    # cached decoding: a forward of one position continues the previous one's entry while it lasts
    carry = Carry(torch.tensor([0]), torch.tensor([2]))
    step = torch.tensor([[far]])
    assert route(step, keys, radii, "euclidean", carry=carry, spans=spans).tolist() == [[0]]
    rest = torch.tensor([[far, far, far]])
    assert route(rest, keys, radii, "euclidean", carry=carry, spans=spans).tolist() == [[0, 0, -1]]
    # without spans the carried entry holds
    assert route(rest, keys, radii, "euclidean", carry=Carry(torch.tensor([1]), torch.tensor([2**62]))).tolist() == [
        [1, 1, 1]
    ]


def test_update_codebook_add_expand_split_replace():
    keys = torch.tensor([[0.0, 0.0]])
    radii = torch.tensor([1.0])
    far = update_codebook(keys, radii, ["Paris"], torch.tensor([5.0, 0.0]), "Rome", 1.0, "euclidean")
    assert far.action == "add" and far.row == 1 and far.radii.tolist() == [1.0, 1.0]
    same = update_codebook(keys, radii, ["Paris"], torch.tensor([1.5, 0.0]), "Paris", 1.0, "euclidean")
    assert same.action == "expand" and same.row == 0 and same.new_key is None
    assert 1.5 < float(same.radii[0]) < 1.51
    other = update_codebook(keys, radii, ["Paris"], torch.tensor([1.5, 0.0]), "Rome", 1.0, "euclidean")
    assert other.action == "split" and other.row == 1 and other.radii.tolist() == [0.75, 0.75]
    again = update_codebook(keys, radii, ["Paris"], torch.tensor([0.0, 0.0]), "Rome", 1.0, "euclidean")
    assert again.action == "replace" and again.row == 0 and again.labels == ["Rome"]
    assert radii.tolist() == [1.0]  # inputs untouched
    empty = update_codebook(torch.zeros(0, 2), torch.zeros(0), [], torch.tensor([1.0, 1.0]), "x", 0.5, "euclidean")
    assert empty.action == "add" and empty.radii.tolist() == [0.5]


def test_growable_views_share_storage_and_are_never_rewritten():
    g = Growable(torch.zeros(0, 3), capacity=2)
    v1 = g.append(torch.ones(1, 3))
    v2 = g.append(2 * torch.ones(1, 3))
    v3 = g.append(3 * torch.ones(1, 3))  # reallocates
    assert v1.tolist() == [[1, 1, 1]] and v2[:, 0].tolist() == [1, 2] and v3[:, 0].tolist() == [1, 2, 3]
    cache = TailCache()
    grown = cache.grow(v3)  # a tensor the cache did not hand out: copied
    assert grown.buf.data_ptr() != v3.data_ptr()
    latest = grown.append(4 * torch.ones(1, 3))
    assert cache.grow(latest) is grown  # the latest view owns the tail: appended in place
    grown.append(torch.zeros(1, 3))
    assert cache.grow(latest) is not grown  # no longer the tail: copied, so `latest` stays valid
    assert latest[:, 0].tolist() == [1, 2, 3, 4] and v3[:, 0].tolist() == [1, 2, 3]
