"""Eviction inside Hugging Face's own ``model.generate``, and a one-call context + question pipeline.

::

    with lookaheadkv.evicting(model, LookaheadKV(budget=128)):
        out = model.generate(**inputs, max_new_tokens=64)   # sampling, streamers, stopping criteria unchanged

How it works (transformers 5.x). Inside the block the model's ``forward`` is wrapped (an attribute
on the instance, removed on exit: nothing else is patched, no hook stays). ``generate`` calls
``forward`` once over the prompt with an empty cache, then once per new token with the cache the
previous call returned:

* the prompt call runs our own pipeline on each row, at batch size 1 with the row's padding cut
  off (:func:`lookaheadkv.engine.select_kv`: the policy's observer and tail, LookaheadKV's tokens
  riding in the prefill, scoring, top-k per KV head, the physical gather), and returns the last
  prompt position's logits with an :class:`EvictedCache` holding only the kept entries;
* each later call runs the model's own forward through the engine's attention over that cache,
  with the rows' TRUE positions: the next token of a prompt of ``L`` tokens is at position ``L``,
  whatever number of entries was kept (the cache tracks each row's position itself and reports to
  ``generate`` the length ``generate`` expects, not the number of entries it stores). The rows of
  a batch hold different numbers of entries; the padding is masked out of every step.

``generate`` itself picks the tokens, so sampling, logits processors, streamers, stopping
criteria and ``max_new_tokens`` behave as without eviction.

With a ``decode_budget`` (:class:`lookaheadkv.engine.rescore.DecodeBudget`) the cache stays at or
under the budget while ``generate`` decodes, as in :func:`lookaheadkv.engine.generate_ids`: the
prompt's eviction keeps at most ``budget`` entries per KV head, each step runs under the policy's
decode-time observer, and every ``interval`` tokens the cache is re-scored and cut back to the
budget in place (the :class:`EvictedCache` shares its layer objects with the prompt's selection,
on which the re-scoring works). One prompt at a time, one new token per step.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from contextlib import contextmanager
from typing import Iterator

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..engine.attention import check_eviction_window, hooked
from ..engine.batch import split_rows
from ..engine.cache import copy_cache, stack_caches
from ..engine.decode import Sampling, decode
from ..engine.generate import Generation, Selection, check_max_new_tokens, check_policy, eos_ids, select_kv
from ..engine.prefill import forward_rows
from ..engine.rescore import BudgetedDecoding, DecodeBudget, as_decode_budget, decode_scorer


class EvictedCache(DynamicCache):
    """The compressed caches of a batch's rows, in the shape ``generate`` passes around.

    Layer ``l`` holds (batch, kv_heads, k_l, head_dim): each row's kept entries, padded to the
    longest row (``padding``: per layer a (batch, 1, 1, k) mask of the real entries, [] when no
    layer is ragged). :meth:`get_seq_length` reports the sequence length ``generate`` has seen (the
    padded prompt plus the tokens since), not the entries stored; ``positions`` (batch,) holds each
    row's TRUE next position. Beam search's reordering keeps masks and positions with their rows.
    """

    def __init__(self, selections: list[Selection], seen: int):
        super().__init__()
        if len(selections) == 1:
            self.layers, self.padding = selections[0].cache.layers, []
        else:
            stacked, self.padding = stack_caches([s.cache for s in selections])
            self.layers = stacked.layers
        self.positions = torch.tensor([s.length for s in selections])
        self.seen = seen
        self.budgeted: BudgetedDecoding | None = None  # under a decode budget (one row): re-scores the layers in place
        self.fed = 0  # tokens fed since the prompt

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def advance(self, n: int) -> None:
        self.seen += n
        self.positions = self.positions + n

    def _rows(self, index: torch.Tensor) -> None:
        index = torch.as_tensor(index).to(self.positions.device)
        self.positions = self.positions[index]
        self.padding[:] = [m[index.to(m.device)] for m in self.padding]

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._rows(indices)

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._rows(torch.arange(len(self.positions)).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("an evicted cache cannot be cropped (assisted or speculative generation): generate without assistant_model / prompt_lookup_num_tokens inside evicting()")


class _Evicting:
    """The state of one ``evicting()`` block: the wrapped forward, what the last prompt call kept."""

    def __init__(self, model: torch.nn.Module, policy, decode_budget: DecodeBudget | None = None):
        self.model, self.policy, self.decode_budget = model, policy, decode_budget
        self.original = model.forward
        self.signature = inspect.signature(self.original)
        self.busy = False
        self.kept: list[list[torch.Tensor] | None] = []  # per row of the last prompt: per layer (kv_heads, k) kept positions; None: all
        self.stats: list = []  # per row of the last prompt: its engine Stats (prefill and eviction)
        self.decode_eviction = None  # under a decode budget: the last prompt's DecodeRecord (engine.rescore)

    def forward(self, *args, **kwargs):
        if self.busy:  # the engine's own calls (prefill, a policy's extend or draft) reach the model itself
            return self.original(*args, **kwargs)
        self.busy = True
        try:
            return self._forward(**self.signature.bind_partial(*args, **kwargs).arguments)
        finally:
            self.busy = False

    def _forward(self, **kw):
        extra = kw.pop("kwargs", {})  # the forward's **kwargs, as bound
        kw.update(extra)
        cache = kw.pop("cache", None)
        if cache is None:
            cache = kw.pop("past_key_values", None)
        if isinstance(cache, EvictedCache):
            return self._step(cache, **kw)
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                f"the model was given a cache that already holds {cache.get_seq_length()} tokens: inside evicting() the prompt's "
                "cache is built and compressed by the prompt's own forward; call generate with the whole prompt and no cache"
            )
        if kw.get("use_cache") is False:
            raise ValueError("use_cache=False: eviction compresses the cache, so there must be one; drop use_cache=False inside evicting()")
        return self._prompt(**kw)

    def _prompt(self, input_ids=None, attention_mask=None, inputs_embeds=None, **_):
        if input_ids is None:
            raise ValueError("evicting() needs input_ids (token ids), not inputs_embeds: pass the tokenizer's input_ids to generate")
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
            raise ValueError("evicting() takes a 2-D attention_mask (batch, L), as the tokenizer returns it: pass that one")
        budget = self.decode_budget
        if budget is not None and input_ids.shape[0] > 1:
            raise NotImplementedError(
                f"a decode budget inside evicting() decodes one prompt at a time, got a batch of {input_ids.shape[0]}: "
                "call generate once per prompt (with num_beams=1 and num_return_sequences=1)"
            )
        rows = split_rows(input_ids, attention_mask)
        selections = [select_kv(self.model, row, self.policy, cap=None if budget is None else budget.budget) for row in rows]
        self.kept, self.stats = [s.kept for s in selections], [s.stats for s in selections]
        budgeted = None
        if budget is not None:  # as generate_ids: on the selection's cache, whose layer objects the EvictedCache shares
            one = selections[0]
            budgeted = BudgetedDecoding(self.model, one.cache, one.kept, one.length, budget, decode_scorer(self.policy, self.model), observer=one.observer)
            one.stats.decode_eviction = self.decode_eviction = budgeted.record
        cache = EvictedCache(selections, input_ids.shape[1])
        cache.budgeted = budgeted
        logits = torch.stack([s.logits for s in selections])[:, None, :]  # (batch, 1, vocab): the last prompt position
        return CausalLMOutputWithPast(logits=logits, cache=cache)

    def _step(self, cache: EvictedCache, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, **kw):
        tokens = input_ids if input_ids is not None else inputs_embeds
        batch, n = tokens.shape[0], tokens.shape[1]
        if batch != len(cache.positions):
            raise ValueError(f"the batch has {batch} rows but the evicted cache {len(cache.positions)}: keep the batch that was prefilled inside evicting()")
        if n > 1 and batch > 1:
            raise NotImplementedError("several new tokens per row over an evicted batch: continue one row at a time, or one token per step")
        budgeted = cache.budgeted
        if n > 1 and budgeted is not None:
            raise NotImplementedError(
                f"{n} new tokens in one step under a decode budget (assisted or speculative generation): feed one token per step, or drop decode_budget"
            )
        positions = (cache.positions[:, None] + torch.arange(n)[None]).to(tokens.device)
        if getattr(self.policy, "evicts", True) and self.policy is not None:
            check_eviction_window(self.model, int(positions.max()) + 1)
        kw.pop("use_cache", None)
        observers = budgeted.observers() if budgeted is not None else ()
        with hooked(self.model, observers, padding=cache.padding or None):  # as engine.decode.decode: the re-scoring inside too
            out = self.original(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=positions, cache=cache, use_cache=True, **kw)
            cache.advance(n)
            if budgeted is not None:
                cache.fed += n
                budgeted.after_step(cache.fed)
        return out


@contextmanager
def evicting(model: torch.nn.Module, policy, *, decode_budget: DecodeBudget | int | None = None) -> Iterator[_Evicting]:
    """Inside the block, ``model.generate`` (and any forward over a prompt) evicts the prompt's cache with ``policy``.

    Every registered policy works, LookaheadKV's tokens riding in the prompt's prefill as in
    :func:`lookaheadkv.generate`; ``policy=None`` keeps the whole cache. A batch (left-padded, with
    its attention mask) is evicted row by row, each row keeping its own budget per KV head; padding
    is never scored nor kept. Greedy ``generate`` inside the block gives the tokens of
    :func:`lookaheadkv.generate_ids` with the same policy (tested). The block yields an object
    whose ``kept`` and ``stats`` describe the last prompt's rows. On exit the model is as before:
    the wrapper is removed and nothing else was changed.

    ``decode_budget`` (a :class:`DecodeBudget`, or an int ``n`` for ``DecodeBudget(n)``) also holds
    the cache at or under that many entries per KV head while ``generate`` decodes, re-scored by the
    policy's decode-time scorer every ``interval`` tokens (greedy ``generate`` then gives the tokens
    of ``generate_ids(..., decode_budget=...)``, tested); the yielded object's ``decode_eviction``
    (a :class:`engine.rescore.DecodeRecord`) says what it did for the last prompt. It needs a policy
    with a decode-time scorer (refused on entering the block otherwise), one prompt per ``generate``
    call and one new token per step.

    Examples
    --------
    >>> with evicting(model, LookaheadKV(budget=128)) as ev:
    ...     out = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=64, do_sample=True)
    >>> ev.stats[0].line()
    >>> with evicting(model, SnapKV(budget=128), decode_budget=DecodeBudget(256, interval=32)) as ev:
    ...     out = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=1024)
    >>> ev.decode_eviction.line()
    """
    if policy is not None:
        check_policy(policy)
    decode_budget = as_decode_budget(decode_budget)
    if decode_budget is not None:
        decode_scorer(policy, model)  # refused here, before any forward (each prompt gets a fresh scorer)
    if getattr(model.forward, "__lookaheadkv_evicting__", False):
        raise RuntimeError("this model is already inside evicting(): leave that block first (blocks do not nest)")
    state = _Evicting(model, policy, decode_budget)
    had = "forward" in model.__dict__
    previous = model.__dict__.get("forward")

    @functools.wraps(state.original)  # generate reads the forward's signature (attention_mask, position_ids, logits_to_keep)
    def forward(*args, **kwargs):
        return state.forward(*args, **kwargs)

    forward.__lookaheadkv_evicting__ = True
    model.forward = forward
    try:
        yield state
    finally:
        if had:
            model.forward = previous
        else:
            del model.forward


class EvictionPipeline:
    """One call: a long context compressed once, then a question (or several) answered over it.

    The context is prefilled and evicted with ``policy`` (as kvpress's pipeline does: the question
    is not part of what is compressed, so one compression serves many questions); the question's
    tokens then run over the compressed cache at their true positions and the answer is decoded.
    With a chat template the context and question share one user turn.

    ``decode_budget`` (a :class:`DecodeBudget`, or an int ``n`` for ``DecodeBudget(n)``) holds the
    whole cache, context, question and answer, at or under that many entries per KV head while
    decoding (:mod:`lookaheadkv.engine.rescore`): the context keeps at most ``budget`` minus the
    longest question's tokens, the question's entries are scored with the rest at re-scorings, and
    each answer's ``stats.decode_eviction`` says what was done. It needs a policy with a decode-time
    scorer (refused here otherwise).

    Examples
    --------
    >>> pipe = pipeline(model, tokenizer, LookaheadKV(budget=128))
    >>> pipe(document, question="Who signed it?", max_new_tokens=32)["answer"]
    """

    def __init__(self, model, tokenizer, policy=None, *, chat: bool = True, decode_budget: DecodeBudget | int | None = None):
        if policy is not None:
            check_policy(policy)
        self.model, self.tokenizer, self.policy, self.chat = model, tokenizer, policy, chat
        self.decode_budget = as_decode_budget(decode_budget)
        if self.decode_budget is not None:
            decode_scorer(policy, model)  # refused here, before any forward (each question gets a fresh scorer)

    def split(self, context: str, question: str) -> tuple[list[int], list[int]]:
        """Token ids of the context part (compressed) and of the question part (run after it)."""
        tok = self.tokenizer
        if self.chat and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": f"{context}\n\n{question}"}], add_generation_prompt=True, tokenize=False)
            if context not in text:
                raise ValueError("the chat template changes the context's text (e.g. strips it): pass it stripped, or use pipeline(..., chat=False)")
            cut = text.index(context) + len(context)
            return tok(text[:cut], add_special_tokens=False)["input_ids"], tok(text[cut:], add_special_tokens=False)["input_ids"]
        return tok(context)["input_ids"], tok(f"\n\n{question}", add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def __call__(self, context: str, question: str | list[str], *, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        """``{"answer": text, "generation": Generation}``; a list of such dicts for a list of questions."""
        if not isinstance(context, str) or not context.strip():
            raise ValueError("the context is empty: give the text to compress")
        questions = [question] if isinstance(question, str) else list(question)
        if not questions or not all(isinstance(q, str) and q.strip() for q in questions):
            raise ValueError("question must be a non-empty str or a list of them")
        check_max_new_tokens(max_new_tokens)
        sampling = Sampling(temperature, top_p, seed)
        parts = [self.split(context, q) for q in questions]
        longest = max(len(p[1]) for p in parts)
        budget, cap = self.decode_budget, None
        if budget is not None:  # the question's entries stay with the context's: together within the budget
            cap = budget.budget - longest
            if cap < 1:
                raise ValueError(f"the question has {longest} tokens, as many as the decode budget of {budget.budget} entries or more: raise decode_budget or shorten the question")
        selection = select_kv(self.model, torch.tensor([parts[0][0]]), self.policy, max_new_tokens=longest + max_new_tokens, cap=cap)
        eos = eos_ids(self.model, self.tokenizer)
        out = []
        for context_ids, question_ids in parts:
            if context_ids != parts[0][0]:
                raise ValueError("the chat template renders the context differently for these questions: ask them one call at a time")
            cache = copy_cache(selection.cache) if len(parts) > 1 else selection.cache
            logits = forward_rows(self.model, torch.tensor([question_ids], device=self.model.device), cache, start=selection.length)
            stats, budgeted = selection.stats, None
            if budget is not None:  # the cache holds the kept context entries, then the question's
                scorer = decode_scorer(self.policy, self.model)
                budgeted = BudgetedDecoding(self.model, cache, selection.kept, selection.length, budget, scorer, observer=selection.observer, appended=len(question_ids))
                stats = dataclasses.replace(selection.stats, decode_eviction=budgeted.record)
            tokens = decode(
                self.model,
                cache,
                logits,
                selection.length + len(question_ids),
                max_new_tokens,
                sampling=sampling,
                eos_token_ids=eos,
                observers=budgeted.observers() if budgeted is not None else (),
                after_step=budgeted.after_step if budgeted is not None else None,
            )
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            out.append({"answer": text, "generation": Generation(text, tokens, stats, selection.kept)})
        return out[0] if isinstance(question, str) else out


def pipeline(model, tokenizer, policy=None, *, chat: bool = True, decode_budget: DecodeBudget | int | None = None) -> EvictionPipeline:
    """A callable ``pipe(context, question=..., max_new_tokens=...)``: see :class:`EvictionPipeline`."""
    return EvictionPipeline(model, tokenizer, policy, chat=chat, decode_budget=decode_budget)
