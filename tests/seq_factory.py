"""Sequences without a model, for block-manager and scheduler tests."""
from __future__ import annotations

import torch

from runtime.sequence import SamplingParams, Sequence


def make_seq(seq_id: int, tokens: list[int], keys: list[int] | None = None) -> Sequence:
    return Sequence(seq_id=seq_id, token_ids=list(tokens), num_prompt_tokens=len(tokens),
                    prompt_keys=list(tokens) if keys is None else list(keys), images=[],
                    positions=torch.arange(len(tokens)).expand(3, -1), rope_delta=0, sampling=SamplingParams(),
                    stop_token_ids=frozenset())
