"""The sync-free step restores queues and memory banks of a skipped (non-finite) step from the
rows they journaled (``selfsup.nn.memory.journal_writes``), not from a copy of the whole
memory, and stays exact: parameters, buffers and optimiser state bit-identical."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from selfsup.engine.loop import LoopSchedule, TrainingLoop, journaled_buffer_names
from selfsup.nn.memory import FIFOQueue, IndexMemoryBank, journal_writes
from selfsup.registry import BACKBONES, METHODS
from tests.engine.test_step_sync import _bit_equal, _data, _device_views, _optimizer, _poison, _state

MOCO = {"proj_hidden_dim": 16, "proj_dim": 8, "num_samples": 64, "batch_size": 8}
CASES: dict[str, dict[str, Any]] = {
    "moco_v2": {**MOCO, "queue_size": 32},
    # Two enqueues per step into an 8-row queue: the second overwrites the first's rows.
    "moco_v2_symmetric": {**MOCO, "queue_size": 8, "symmetric": True},
    "instdisc": {"num_samples": 64, "feat_dim": 8, "num_negatives": 16},
}


def _loop(case: str) -> TrainingLoop:
    torch.manual_seed(0)
    backbone = BACKBONES.build("convnet", in_channels=1, image_size=8, width=8)
    method = METHODS.build(case.removesuffix("_symmetric"), backbone=backbone, **CASES[case])
    method.train()
    schedule = LoopSchedule(total_steps=8, steps_per_epoch=4, peak_lr=1e-2, ema_momentum=(0.9, 0.99))
    return TrainingLoop(method, _optimizer(method, "sgd"), schedule, _device_views, torch.device("cpu"), sync_free=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_skipped_step_restores_the_journaled_memory_exactly(case: str) -> None:
    loop = _loop(case)
    assert loop._journaled, "the queue / bank is restored from its journal, not copied"
    _poison(loop.method, {2})
    for step in (0, 1):
        loop.step(_data(step), loop.step_info(step))
    before = _state(loop)
    loop.step(_data(2), loop.step_info(2))
    changed = [k for k, v in _state(loop).items() if not _bit_equal(before[k], v)]
    assert not changed, changed
    loop._unchecked.clear()  # the NaN step is the point here, not its report
    loop.step(_data(3), loop.step_info(3))
    assert any(not _bit_equal(before[k], v) for k, v in _state(loop).items() if "queue" in k or "bank" in k)


@pytest.mark.parametrize("case", sorted(CASES))
def test_good_steps_match_the_whole_copy_restore_bit_for_bit(case: str) -> None:
    """The journal's undo rewrites the rows' own values on a finite step: the same state as
    the previous design (every buffer copied and ``torch.where``-restored), with a NaN step
    in between."""
    journaled, copied = _loop(case), _loop(case)
    copied._journaled = frozenset()  # the old design: the queue / bank is copied whole
    for loop in (journaled, copied):
        _poison(loop.method, {1})
    for step in range(4):
        for loop in (journaled, copied):
            torch.manual_seed(100 + step)  # the same augmentation and negative draws for both
            loop.step(_data(step), loop.step_info(step))
    a, b = _state(journaled), _state(copied)
    assert sorted(a) == sorted(b)
    assert all(_bit_equal(a[k], b[k]) for k in a), [k for k in a if not _bit_equal(a[k], b[k])]


def test_the_journal_holds_only_the_written_rows() -> None:
    queue, bank = FIFOQueue(65536, 128), IndexMemoryBank(1000, 16)
    keys, index = torch.randn(256, 128), torch.arange(10, 20)
    original_queue, original_bank = queue.queue.clone(), bank.bank.clone()
    with journal_writes() as journal:
        queue.enqueue(keys)
        bank.update(index, torch.randn(10, 16))
    assert [tuple(w.before.shape) for w in journal] == [(256, 128), (10, 16)]  # 128 KiB, not 32 MiB
    assert torch.equal(journal[0].before, original_queue[:256]) and torch.equal(journal[1].before, original_bank[10:20])
    queue.enqueue(keys)  # outside the block: nothing recorded
    assert len(journal) == 2
    assert journaled_buffer_names(torch.nn.ModuleDict({"q": queue, "b": bank})) == {"q.queue", "b.bank"}


def test_a_write_that_bypasses_the_journal_is_refused() -> None:
    loop = _loop("moco_v2")
    original = loop.method.on_step_end

    def sneaky(info: Any, outputs: Any) -> None:
        original(info, outputs)
        loop.method.queue.queue[0].zero_()

    loop.method.on_step_end = sneaky
    with pytest.raises(RuntimeError, match="'queue.queue' was replaced or written outside"):
        loop.step(_data(0), loop.step_info(0))
