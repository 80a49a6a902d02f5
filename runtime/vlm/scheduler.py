"""Continuous batching: each step decodes every running sequence and fills what is left of the token budget with
prefills of waiting ones, so requests join and leave between steps.

  * decode first, oldest first: a stream in progress is never starved by new arrivals;
  * scoring before explaining: a waiting yes/no scoring request (one prefill, the answer a client is waiting
    for) is admitted ahead of waiting explanations, however many explanations queued before it;
  * when a decoding sequence needs a block and none is free, the newest running sequence is preempted by
    recompute: its blocks are freed (their prefix-cache entries survive until reused) and it goes back to the
    front of the queue, to be prefilled again with its generated tokens;
  * no admissions in a step that preempted, so a victim is not re-admitted only to be preempted again;
  * a prefill costs its uncached tokens against max_num_batched_tokens; prefills are never split.

After the model ran a batch, postprocess() samples each generating sequence's next token, reads P(yes) of each
scoring one, and finishes those that are done (scored, a stop token, max_new_tokens or max_model_len).
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import torch

from runtime.vlm.block_manager import BlockManager
from runtime.vlm.sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)


@dataclass
class ScheduledBatch:
    prefill: list[Sequence] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)

    @property
    def seqs(self) -> list[Sequence]:
        """Prefill sequences first, then decoding ones: the order of the model's output rows."""
        return self.prefill + self.decode

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, generator: torch.Generator | None = None):
        if max_num_batched_tokens < max_model_len:
            raise ValueError(f"max_num_batched_tokens {max_num_batched_tokens} must be >= max_model_len "
                             f"{max_model_len}: prefills are not split, so one full prompt must fit a step")
        if max_num_seqs < 1 or max_num_seqs > max_num_batched_tokens:
            raise ValueError(f"max_num_seqs {max_num_seqs} must be in 1..max_num_batched_tokens")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self.num_preemptions = 0
        self.num_prefill_tokens = 0  # tokens computed by prefills (recomputed ones after preemption included)
        self.num_cached_prefill_tokens = 0  # tokens prefills took from the prefix cache instead
        self.generator = generator  # for temperature sampling; None: torch's default

    def add(self, seq: Sequence) -> None:
        if len(seq) > self.max_model_len:
            raise ValueError(f"prompt of {len(seq)} tokens exceeds max_model_len {self.max_model_len}")
        seq.status = SequenceStatus.WAITING
        if seq.score_token_ids is None:
            self.waiting.append(seq)
            return
        first_generating = next((i for i, w in enumerate(self.waiting) if w.score_token_ids is None), None)
        if first_generating is None:
            self.waiting.append(seq)
        else:
            self.waiting.insert(first_generating, seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        bm = self.block_manager
        batch = ScheduledBatch()
        queue = deque(self.running)
        preempted = False
        while queue:
            seq = queue.popleft()
            while not bm.can_append(seq):
                preempted = True
                if queue:
                    self._preempt(queue.pop())
                else:
                    self._preempt(seq)
                    seq = None
                    break
            if seq is not None:
                bm.append_slot(seq)
                batch.decode.append(seq)
        budget = self.max_num_batched_tokens - len(batch.decode)
        while self.waiting and not preempted and len(batch.decode) + len(batch.prefill) < self.max_num_seqs:
            seq = self.waiting[0]
            matched = bm.match_prefix(seq)
            cost = len(seq) - len(matched) * bm.block_size
            if cost > budget or not bm.can_allocate(seq, matched):
                break
            bm.allocate(seq, matched)
            self.num_prefill_tokens += len(seq) - seq.num_cached_tokens
            self.num_cached_prefill_tokens += seq.num_cached_tokens
            if seq.first_cached_tokens is None:
                seq.first_cached_tokens = seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            batch.prefill.append(seq)
            budget -= cost
        self.running = batch.decode + batch.prefill
        return batch

    def postprocess(self, seqs: list[Sequence], logits: torch.Tensor) -> list[list[int]]:
        """After the model ran `seqs` (logits row i is seqs[i]'s last token): register their written blocks, then
        score, extend or finish each one; returns the tokens each sequence gained."""
        next_tokens = sample(logits, seqs, self.generator)
        p_yes = yes_probabilities(logits, seqs)
        new_tokens: list[list[int]] = []
        for row, seq in enumerate(seqs):
            self.block_manager.commit(seq, len(seq))
            if seq.score_token_ids is not None:
                seq.p_yes = p_yes[row]
                self.finish(seq, "scored")
                new_tokens.append([])
                continue
            if seq.sampling.max_new_tokens == 0:
                self.finish(seq, "length")
                new_tokens.append([])
                continue
            token = next_tokens[row]
            seq.token_ids.append(token)
            new_tokens.append([token])
            if token in seq.stop_token_ids and not seq.sampling.ignore_eos:
                self.finish(seq, "stop")
            elif seq.num_generated_tokens >= seq.sampling.max_new_tokens or len(seq) >= self.max_model_len:
                self.finish(seq, "length")
        return new_tokens

    def finish(self, seq: Sequence, reason: str) -> None:
        """End seq now and release its blocks (they stay in the prefix cache until reused)."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        log.debug("preempting sequence %d at %d tokens (out of KV blocks)", seq.seq_id, len(seq))
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)


def yes_probabilities(logits: torch.Tensor, seqs: list[Sequence]) -> dict[int, float]:
    """P(yes) over {yes, no} by row, for the scoring rows: one device-to-host read for all of them."""
    rows = [row for row, seq in enumerate(seqs) if seq.score_token_ids is not None]
    if not rows:
        return {}
    pairs = torch.tensor([seqs[row].score_token_ids for row in rows], dtype=torch.int64)  # (n, 2): yes, no
    picked = logits[torch.tensor(rows)[:, None].to(logits.device), pairs.to(logits.device)]
    return dict(zip(rows, torch.softmax(picked, dim=1)[:, 0].tolist()))


def sample(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator | None) -> list[int]:
    """The next token of every row: greedy where the sequence's temperature is 0, else sampled."""
    greedy = logits.argmax(dim=-1)
    temps = [s.sampling.temperature for s in seqs]
    if not any(temps):
        return greedy.tolist()
    t = torch.tensor([max(x, 1e-6) for x in temps], device=logits.device)[:, None]
    sampled = torch.multinomial(torch.softmax(logits / t, dim=-1), 1, generator=generator)[:, 0]
    use_greedy = torch.tensor([x == 0 for x in temps], device=logits.device)
    return torch.where(use_greedy, greedy, sampled).tolist()
