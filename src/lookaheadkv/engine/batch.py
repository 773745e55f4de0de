"""Many prompts at once: each prompt prefilled, scored and evicted alone, the answers decoded together.

A batch of prompts of different lengths arrives left-padded (``input_ids`` (B, L) and its
``attention_mask``) or as a list of token-id rows. Each row's padding is cut off and the row is
prefilled, scored and evicted on its own, at batch size 1 (:func:`engine.generate.select_kv`):
padding is never scored, never kept, and every row keeps its own ``budget`` entries per KV head,
exactly what a single run keeps. The compressed caches are then decoded together
(:func:`engine.decode.decode_batch`: one forward per step for all rows, each row at its own true
positions, ragged caches padded and masked), so the weights are read once per step for the batch.
Every registered policy batches this way: scoring never sees a second row.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from .decode import Sampling, decode_batch
from .generate import Generation, Stats, check_max_new_tokens, check_policy, encode_prompt, eos_ids, select_kv

MASK_FIX = "left-pad the prompts (tokenizer.padding_side = 'left') and pass the attention_mask the tokenizer returned"


def split_rows(input_ids, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The prompts of a batch as (1, L_i) rows without their padding, or a one-line error naming the fix.

    ``input_ids`` is a (B, L) integer tensor, left-padded, with its ``attention_mask`` (B, L) of 0
    (padding) and 1 (tokens); or a list of rows (1-D tensors, (1, L_i) tensors or lists of ids),
    which need no mask. A mask must be one block of 0s then one block of 1s per row.
    """
    if isinstance(input_ids, (list, tuple)):
        if attention_mask is not None:
            raise ValueError("attention_mask is only for a padded (B, L) tensor: give a list of prompts without a mask, or one padded tensor with its mask")
        if not input_ids:
            raise ValueError("the batch is empty: give at least one prompt")
        rows = []
        for i, row in enumerate(input_ids):
            row = torch.as_tensor(row)
            if row.dim() == 2 and row.shape[0] == 1:
                row = row[0]
            if row.dim() != 1:
                raise ValueError(f"prompt {i} of the list has shape {tuple(row.shape)}: give each prompt as 1-D ids (L,) or (1, L)")
            rows.append(row[None])
        return rows
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a (batch, L) tensor or a list of prompts' ids, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, L), got {tuple(input_ids.shape)}: stack the prompts' ids as rows")
    if attention_mask is None:
        return [row[None] for row in input_ids]
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask has shape {shape} but input_ids {tuple(input_ids.shape)}: give the 2-D mask the tokenizer returned with these ids")
    mask = attention_mask.to("cpu")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (tokens): {MASK_FIX}")
    rows = []
    for i, (ids, m) in enumerate(zip(input_ids, mask.long())):
        n = int(m.sum())
        if n == 0:
            raise ValueError(f"row {i} of the batch is all padding: drop it from the batch")
        if not bool((m[-n:] == 1).all()):
            where = "ends in padding (right padding)" if int(m[-1]) == 0 else "has holes (a 0 between 1s)"
            raise ValueError(f"attention_mask row {i} {where}: {MASK_FIX}")
        rows.append(ids[-n:][None])
    return rows


def generate_batch_ids(
    model: torch.nn.Module,
    input_ids,
    policy,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    sampling: Sampling = Sampling(),
    eos_token_ids=(),
) -> list[tuple[list[int], Stats, list[torch.Tensor] | None]]:
    """:func:`engine.generate.generate_ids` for a batch: per prompt (tokens, stats, kept), in order.

    ``input_ids``: a left-padded (B, L) tensor with its ``attention_mask``, or a list of prompts'
    ids (see :func:`split_rows`). Each row equals its single run (greedy: the same tokens, tested;
    sampling with a ``seed``: each row draws from its own generator seeded with it). A row's
    ``decode_seconds`` is the whole batch's decoding time.
    """
    check_max_new_tokens(max_new_tokens)
    if policy is not None:
        check_policy(policy)
    rows = split_rows(input_ids, attention_mask)
    selections = []
    for row in rows:
        selections.append(select_kv(model, row, policy, max_new_tokens=max_new_tokens))
    start = time.perf_counter()
    outputs = decode_batch(
        model,
        [s.cache for s in selections],
        torch.stack([s.logits for s in selections]),
        [s.length for s in selections],
        max_new_tokens,
        eos_token_ids=eos_token_ids,
        sampling=sampling,
    )
    seconds = time.perf_counter() - start
    results = []
    for selection, tokens in zip(selections, outputs):
        selection.stats.decode_seconds, selection.stats.new_tokens = seconds, len(tokens)
        results.append((tokens, selection.stats, selection.kept))
    return results


def generate_batch(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    policy=None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = True,
) -> list[Generation]:
    """Answer several prompts at once, each with its own cache compressed by ``policy``: one :class:`Generation` per prompt.

    Examples
    --------
    >>> outs = generate_batch(model, tokenizer, [doc1 + q1, doc2 + q2], LookaheadKV(budget=128))
    >>> [o.text for o in outs]
    """
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}: for one prompt use generate(), or wrap it in a list")
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    if policy is not None:
        check_policy(policy)
    sampling = Sampling(temperature, top_p, seed)
    rows = [encode_prompt(tokenizer, p, chat)[0] for p in prompts]
    results = generate_batch_ids(model, rows, policy, max_new_tokens=max_new_tokens, sampling=sampling, eos_token_ids=eos_ids(model, tokenizer))
    return [Generation(tokenizer.decode(tokens, skip_special_tokens=True), tokens, stats, kept) for tokens, stats, kept in results]
