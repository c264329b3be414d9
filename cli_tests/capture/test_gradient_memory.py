"""The memory rule of :class:`~dcn_inspect.capture.gradients.GradientForward`'s batched copies
(issue 24): the copies may use :data:`EXTRA_MEMORY_SHARE` of the single-image forward+backward's
own memory, each costing what the forward had saved by the units' layer (a masked image without
gradients: a few of the largest maps); the results do not depend on the batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcn_inspect.capture.gradients import (
    BACKWARD_FACTOR,
    EXTRA_MEMORY_SHARE,
    LIVE_MAPS,
    PROCESS_BASELINE_BYTES,
    GradientForward,
)
from dcn_inspect.ops import DeformConv2dPack

UNITS = torch.tensor([[9, 9], [3, 15], [0, 0], [17, 21], [8, 2]])


class TwoLayers(nn.Module):
    """Two deformable layers and a head after them (the head's saved maps are not the units')."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.dcn_a = DeformConv2dPack(3, 4, 3, padding=1)
        self.dcn_b = DeformConv2dPack(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 8, 3, padding=1)
        nn.init.normal_(self.dcn_a.conv_offset.weight, std=0.2)
        nn.init.normal_(self.dcn_b.conv_offset.weight, std=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.dcn_b(torch.relu(self.dcn_a(x)))))


@pytest.fixture
def forward() -> GradientForward:
    return GradientForward(TwoLayers().eval(), torch.rand(1, 3, 18, 22))


def _weight_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def test_budget_is_the_share_of_baseline_weights_and_saved_activations(
    forward: GradientForward,
) -> None:
    tensors = _weight_bytes(forward.model) + forward.saved_bytes
    assert forward.saved_bytes > 0
    # masked images: a share of everything; gradient copies: of the model's own tensors only
    # (a backward through the kept graph is cheaper than a copy's forward+backward)
    own = PROCESS_BASELINE_BYTES + tensors
    assert forward.memory_budget() == int(EXTRA_MEMORY_SHARE * own)
    assert forward.memory_budget(gradients=True) == int(EXTRA_MEMORY_SHARE * tensors)


def test_a_gradient_copy_costs_twice_what_the_forward_had_saved_by_the_units_layer(
    forward: GradientForward,
) -> None:
    saved_a, saved_b = forward.saved_until["dcn_a"][0], forward.saved_until["dcn_b"][0]
    assert 0 < saved_a < saved_b < forward.saved_bytes  # the head saves after dcn_b
    assert BACKWARD_FACTOR == 2
    assert forward.copy_bytes("dcn_b") == 2 * saved_b
    assert forward.copy_bytes() == 2 * forward.saved_bytes  # the whole forward


def test_a_masked_copy_costs_a_few_of_the_largest_maps_at_most_what_was_saved(
    forward: GradientForward,
) -> None:
    saved, largest = forward.saved_until["dcn_b"]
    image = forward.images.numel() * forward.images.element_size()
    plain = forward.copy_bytes("dcn_b", gradients=False)
    assert plain == min(saved, LIVE_MAPS * largest + 2 * image)
    assert 0 < plain <= saved < forward.copy_bytes("dcn_b")


def test_replicas_are_the_budget_over_the_copy_at_most_the_batch_size_at_least_one(
    forward: GradientForward,
) -> None:
    each = forward.copy_bytes("dcn_b")
    assert forward.replicas(8, 3 * each + each // 2, "dcn_b") == 3
    assert forward.replicas(2, 3 * each, "dcn_b") == 2
    assert forward.replicas(8, each - 1, "dcn_b") == 1
    # an enormous saved size leaves room for one copy, a tiny one for the whole batch
    forward.saved_until["dcn_b"] = (10**15, 10**12)
    assert forward.replicas(8, layer="dcn_b") == 1
    assert forward.replicas(8, layer="dcn_b", gradients=False) == 1
    forward.saved_until["dcn_b"] = (1, 1)
    assert forward.replicas(8, layer="dcn_b") == 8
    assert forward.replicas(8, layer="dcn_b", gradients=False) == 8


def test_replicas_follow_the_default_budget_and_are_the_same_on_the_same_input() -> None:
    model, image = TwoLayers().eval(), torch.rand(1, 3, 18, 22)
    first, again = GradientForward(model, image), GradientForward(model, image)
    for gradients in (True, False):
        budget = first.memory_budget(gradients)
        expected = max(1, min(64, budget // first.copy_bytes("dcn_b", gradients)))
        assert first.replicas(64, layer="dcn_b", gradients=gradients) == expected
        assert again.replicas(64, layer="dcn_b", gradients=gradients) == expected


def test_gradients_do_not_depend_on_the_memory_the_copies_may_use(
    forward: GradientForward,
) -> None:
    levels = ["dcn_b", "dcn_a"]
    each = forward.copy_bytes("dcn_b")
    batched = list(forward.backward_units("dcn_b", UNITS, levels=levels, memory_bytes=8 * each))
    single = list(forward.backward_units("dcn_b", UNITS, levels=levels, memory_bytes=0))
    assert [b.input_grad.shape[0] for b in batched] == [5]
    assert [b.input_grad.shape[0] for b in single] == [1] * 5
    torch.testing.assert_close(
        torch.cat([b.input_grad for b in single]), batched[0].input_grad, rtol=1e-4, atol=1e-6
    )
    for name in levels:
        torch.testing.assert_close(
            torch.cat([b.offset_grads[name] for b in single]),
            batched[0].offset_grads[name],
            rtol=1e-4,
            atol=1e-6,
        )


def test_masked_responses_do_not_depend_on_the_masked_batch(forward: GradientForward) -> None:
    boxes = torch.tensor(
        [[0, 0, 22, 18], [2, 1, 12, 9], [5, 5, 6, 6], [0, 0, 1, 1], [3, 4, 20, 17]]
    )
    one = forward.evaluate_masked("dcn_b", UNITS, boxes, None, batch_size=1)
    many = forward.evaluate_masked("dcn_b", UNITS, boxes, None, batch_size=4)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-8)
    full = forward.responses("dcn_b", UNITS[:1], None)
    torch.testing.assert_close(one[:1], full, rtol=1e-5, atol=1e-8)


def test_released_graph_frees_the_saved_activations_and_keeps_the_numbers() -> None:
    """``keep_graph=False`` frees the forward's graph before the masked forwards: the saved maps
    are gone (a weak reference to the kept output, the graph's end, dies), backwards are
    refused, and every number equals a run that keeps the graph."""
    import gc
    import weakref

    from dcn_inspect.analysis.receptive_field import receptive_fields
    from dcn_inspect.capture.selection import select_layers

    std = (58.395, 57.12, 57.375)
    image = torch.rand(1, 3, 18, 22)
    results = []
    for keep in (True, False):
        forward = GradientForward(TwoLayers().eval(), image)
        records = list(select_layers(forward.deformable_records(), None, 1))
        node = weakref.ref(forward.calls[records[0].name].output)
        fields = receptive_fields(
            forward, records, UNITS[:3], (18, 22), std, saliency_step=1, keep_graph=keep
        )
        gc.collect()
        assert forward.has_graph is keep and (node() is not None) is keep
        results.append(fields)
    if not forward.has_graph:
        with pytest.raises(RuntimeError, match="released"):
            next(forward.backward_units(records[0].name, UNITS[:1]))
    kept, released = results
    assert torch.equal(kept.erf, released.erf) and kept.saliency == released.saliency


def test_a_dropped_gradient_forward_leaves_no_graph_behind() -> None:
    """The saved-bytes count (a saved-tensors hook) must not tie a node to its own saved output
    (ReLU saves its result): such a cycle runs through C++, no garbage collection frees it, and
    every image's graph would stay until the process ends."""
    import gc

    def graph_tensors() -> int:
        return sum(
            1
            for o in gc.get_objects()
            if isinstance(o, torch.Tensor) and o.grad_fn is not None and o.shape[-2:] == (18, 22)
        )

    gc.collect()
    before = graph_tensors()
    forward = GradientForward(TwoLayers().eval(), torch.rand(1, 3, 18, 22))
    assert forward.saved_bytes > 0 and graph_tensors() > before
    del forward
    gc.collect()
    assert graph_tensors() == before
