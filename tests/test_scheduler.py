"""Continuous batching without a model: token budget, sequence cap, decode-first, preemption by recompute,
finishing and cancelling between steps."""
from __future__ import annotations

import pytest

from runtime.vlm.block_manager import BlockManager
from runtime.vlm.scheduler import Scheduler
from runtime.vlm.sequence import SequenceStatus
from fixtures.sequences import make_seq

BS = 4


def fake_step(scheduler: Scheduler):
    """One step without a model: what postprocess does after it, reduced to committing written blocks and
    appending one token per sequence."""
    batch = scheduler.schedule()
    for seq in batch.seqs:
        scheduler.block_manager.commit(seq, len(seq))
        seq.token_ids.append(1000 + len(seq))
    return batch


def ids(seqs) -> list[int]:
    return [s.seq_id for s in seqs]


def test_token_budget_and_sequence_cap():
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=3, max_num_batched_tokens=20, max_model_len=20)
    for i, n in enumerate([8, 8, 6, 2, 2]):
        sched.add(make_seq(i, [10 * i + j for j in range(n)]))
    b1 = fake_step(sched)
    assert ids(b1.prefill) == [0, 1] and b1.decode == []  # 8 + 8 fit; 6 more would exceed 20
    b2 = fake_step(sched)
    assert ids(b2.decode) == [0, 1] and ids(b2.prefill) == [2]  # decodes first, then the cap of 3 sequences
    b3 = fake_step(sched)
    assert ids(b3.decode) == [0, 1, 2] and b3.prefill == []
    sched.finish(sched.running[0], "stop")  # a request leaves between steps; one joins
    b4 = fake_step(sched)
    assert ids(b4.decode) == [1, 2] and ids(b4.prefill) == [3]


def test_prefill_cost_counts_only_uncached_tokens():
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=8, max_num_batched_tokens=16, max_model_len=16)
    prompt = list(range(13))
    sched.add(make_seq(0, prompt))
    fake_step(sched)
    sched.finish(sched.running[0], "stop")
    # 13 + 13 tokens exceed the budget of 16, but 12 of each are cached now: both fit, costing 1 + 1.
    sched.add(make_seq(1, prompt))
    sched.add(make_seq(2, prompt))
    batch = fake_step(sched)
    assert ids(batch.prefill) == [1, 2]
    assert [s.num_cached_tokens for s in batch.prefill] == [12, 12]
    assert batch.prefill[0].block_table[:3] == batch.prefill[1].block_table[:3]


def test_preemption_by_recompute_when_blocks_run_out():
    bm = BlockManager(6, BS)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=24)
    a, b = make_seq(0, range(7)), make_seq(1, range(100, 107))
    sched.add(a)
    sched.add(b)
    fake_step(sched)  # both prefilled: 2 full blocks each, then one token appended (8 tokens)
    fake_step(sched)  # decode token 8 (its keys fit the 2 blocks): 9 tokens
    assert bm.num_free_blocks == 2
    fake_step(sched)  # token 9 of each needs a third block: the last 2 free ones
    assert bm.num_free_blocks == 0 and ids(sched.running) == [0, 1]
    for _ in range(3):
        fake_step(sched)
    assert len(a) == len(b) == 13 and bm.num_free_blocks == 0  # 3 full blocks each, one token pending
    batch = fake_step(sched)  # token 12 of a needs a fourth block: b, the newest, is preempted and freed
    assert ids(batch.decode) == [0] and batch.prefill == []  # no admission in the step that preempted
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and b.num_preemptions == 1
    assert list(sched.waiting) == [b] and sched.num_preemptions == 1
    while a.status == SequenceStatus.RUNNING and len(a) < 20:
        fake_step(sched)
    sched.finish(a, "length")
    batch = fake_step(sched)
    # b comes back with its 6 generated tokens (and samples a 7th). a's 2 extra blocks evicted b's freed
    # blocks tail first, so b's first block is still a prefix-cache hit.
    assert batch.prefill == [b] and b.num_cached_tokens == 4 and b.num_generated_tokens == 7


def test_newest_sequence_preempts_itself_when_older_ones_take_the_last_block():
    bm = BlockManager(5, BS)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=24, max_model_len=12)
    old, new = make_seq(0, range(7)), make_seq(1, range(20, 27))
    sched.add(old)
    sched.add(new)
    fake_step(sched)
    fake_step(sched)  # 9 tokens each, 2 full blocks each, 1 free
    batch = fake_step(sched)  # both need a third block: the older gets it, the newer gives its blocks back
    assert ids(batch.decode) == [0] and new.status == SequenceStatus.WAITING and bm.num_free_blocks == 2
    while old.status == SequenceStatus.RUNNING and len(old) < 12:
        fake_step(sched)
    sched.finish(old, "length")
    assert fake_step(sched).prefill == [new] and len(new) == 10 and new.num_cached_tokens == 8


def test_cancel_frees_blocks_at_once():
    bm = BlockManager(16, BS)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32)
    running, waiting = make_seq(0, range(9)), make_seq(1, range(50, 80))
    sched.add(running)
    fake_step(sched)
    sched.add(waiting)
    assert bm.num_free_blocks == 16 - 3
    sched.finish(running, "cancelled")
    assert bm.num_free_blocks == 16 and running.block_table == [] and running.status == SequenceStatus.FINISHED
    sched.finish(waiting, "cancelled")
    assert not sched.has_unfinished() and waiting.finish_reason == "cancelled"


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_num_batched_tokens 8 must be >= max_model_len 16"):
        Scheduler(BlockManager(8, BS), max_num_seqs=2, max_num_batched_tokens=8, max_model_len=16)
    sched = Scheduler(BlockManager(8, BS), max_num_seqs=2, max_num_batched_tokens=16, max_model_len=16)
    with pytest.raises(ValueError, match="exceeds max_model_len 16"):
        sched.add(make_seq(0, range(17)))
