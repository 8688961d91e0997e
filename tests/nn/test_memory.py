"""FIFOQueue wrap-around and IndexMemoryBank updates; both round-trip through state_dict."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.nn.memory import FIFOQueue, IndexMemoryBank


def _ring_reference(size: int, batches: list[torch.Tensor], init: torch.Tensor) -> torch.Tensor:
    queue, ptr = init.clone(), 0
    for batch in batches:
        for row in batch:
            queue[ptr] = row
            ptr = (ptr + 1) % size
    return queue


def test_queue_init_is_unit_norm_and_empty() -> None:
    q = FIFOQueue(10, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(q.queue.norm(dim=1), torch.ones(10))
    assert q.values().shape == (0, 4)
    assert q.values(only_filled=False).shape == (10, 4)
    assert {n for n, _ in q.named_buffers()} == {"queue", "ptr", "filled"}


def test_queue_wraps_around_for_any_batch_size() -> None:
    q = FIFOQueue(7, 3)
    init = q.queue.clone()
    batches = [torch.randn(b, 3) for b in (3, 2, 4, 1, 9, 5)]
    filled = 0
    for i, batch in enumerate(batches):
        q.enqueue(batch)
        filled = min(filled + batch.shape[0], 7)
        assert int(q.filled) == filled
        assert torch.equal(q.queue, _ring_reference(7, batches[: i + 1], init))
    assert int(q.ptr) == sum(b.shape[0] for b in batches) % 7


def test_queue_values_only_filled_rows() -> None:
    q = FIFOQueue(6, 2)
    keys = torch.randn(4, 2)
    q.enqueue(keys)
    assert torch.equal(q.values(), keys)
    v = q.values()
    q.enqueue(torch.randn(4, 2))
    assert torch.equal(v, keys)  # a copy: enqueue cannot alter it
    assert q.values().shape == (6, 2)


def test_queue_state_dict_round_trip() -> None:
    q = FIFOQueue(5, 3)
    q.enqueue(torch.randn(7, 3))
    r = FIFOQueue(5, 3)
    r.load_state_dict(q.state_dict())
    assert torch.equal(r.queue, q.queue) and int(r.ptr) == int(q.ptr) and int(r.filled) == 5
    batch = torch.randn(2, 3)
    q.enqueue(batch)
    r.enqueue(batch)
    assert torch.equal(r.queue, q.queue)


def test_bank_update_get_and_round_trip() -> None:
    bank = IndexMemoryBank(10, 4, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(bank.bank.norm(dim=1), torch.ones(10))
    before = bank.bank.clone()
    index = torch.tensor([2, 7, 4])
    feats = torch.randn(3, 4)
    bank.update(index, feats, momentum=0.5)
    for row, i in enumerate(index.tolist()):
        mixed = 0.5 * before[i] + 0.5 * feats[row]
        assert torch.allclose(bank.get(torch.tensor([i]))[0], mixed / mixed.norm())
    untouched = [i for i in range(10) if i not in index.tolist()]
    assert torch.equal(bank.bank[untouched], before[untouched])
    # momentum 0 stores the normalised features
    bank.update(index, feats, momentum=0.0)
    assert torch.allclose(bank.get(index), F.normalize(feats, dim=1))
    other = IndexMemoryBank(10, 4)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.bank, bank.bank)


def test_bank_sample_negatives_is_reproducible() -> None:
    bank = IndexMemoryBank(20, 3)
    idx, feats = bank.sample_negatives(15, torch.Generator().manual_seed(3))
    idx2, _ = bank.sample_negatives(15, torch.Generator().manual_seed(3))
    assert idx.shape == (15,) and feats.shape == (15, 3)
    assert torch.equal(idx, idx2) and torch.equal(feats, bank.bank[idx])
    assert idx.min() >= 0 and idx.max() < 20
