"""prefill -> scores -> keep top-k per KV head -> decode: the whole pipeline in one call."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .attention import check_eviction_window
from .cache import gather, kv_bytes, lengths
from .decode import Sampling, decode
from .evict import select
from .prefill import Prefill, check_input_ids, prefill
from .rescore import BudgetedDecoding, DecodeBudget, DecodeRecord, as_decode_budget, decode_scorer


@dataclass
class Compressed:
    """A prompt's cache after eviction, ready to decode from."""

    prefill: Prefill
    cache: object  # DynamicCache
    kept: list[torch.Tensor] | None  # per layer (kv_heads, k) kept prompt positions; None = all
    score_seconds: float
    evict_seconds: float


@dataclass
class Stats:
    prompt_tokens: int
    kept_per_layer: list[int]
    kv_bytes_before: int
    kv_bytes_after: int
    prefill_seconds: float
    eviction_seconds: float  # scoring + top-k + gather
    decode_seconds: float = 0.0
    new_tokens: int = 0
    tail_rows: int = 0  # a policy's extra rows inside the prefill (LookaheadKV's tokens): their time is in prefill_seconds
    decode_eviction: DecodeRecord | None = None  # what a decode budget did (engine.rescore); None without one

    def line(self) -> str:
        kept = sorted(set(self.kept_per_layer))
        kept_txt = str(kept[0]) if len(kept) == 1 else f"{min(kept)}-{max(kept)}"
        return (
            f"prompt {self.prompt_tokens} tok | kept/layer {kept_txt} | KV {self.kv_bytes_before / 2**20:.2f} MiB"
            f" -> {self.kv_bytes_after / 2**20:.2f} MiB | prefill {self.prefill_seconds:.2f}s"
            + (f" (with {self.tail_rows} lookahead rows)" if self.tail_rows else "")
            + f" | eviction {self.eviction_seconds * 1000:.1f}ms | decode {self.new_tokens} tok in {self.decode_seconds:.2f}s"
            + (f" | {self.decode_eviction.line()}" if self.decode_eviction is not None else "")
        )


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stats: Stats
    kept: list[torch.Tensor] | None = field(default=None, repr=False)


def compress(model: torch.nn.Module, state: Prefill, policy, observer=None, cap: int | None = None) -> Compressed:
    """Score ``state``'s prompt with ``policy`` and build the evicted cache (``state`` is untouched; None keeps it all).

    ``cap``: no layer keeps more than this many entries per KV head (a decode budget).
    """
    start = time.perf_counter()
    scores = None if policy is None else policy.scores(model, state, observer)
    scored = time.perf_counter()
    if scores is None:
        return Compressed(state, state.cache, None, scored - start, 0.0)
    budgets = policy.layer_budgets(len(scores), state.length)
    if cap is not None:
        budgets = [min(b, cap) for b in budgets]
    kept = select(scores, budgets)
    cache = gather(state.cache, kept)
    return Compressed(state, cache, kept, scored - start, time.perf_counter() - scored)


def check_policy(policy) -> None:
    """A policy must be an instance (``SnapKV(budget=128)``), not a name or a class (checked by shape: the engine imports no policy)."""
    if isinstance(policy, str):
        raise TypeError(f"policy must be a Policy instance, got the string {policy!r}: use make_policy({policy!r}, budget=...) or e.g. SnapKV(budget=128)")
    if isinstance(policy, type):
        raise TypeError(f"policy must be a Policy instance, got the class {policy.__name__}: instantiate it, e.g. {policy.__name__}(budget=128)")
    if not all(callable(getattr(policy, a, None)) for a in ("observer", "tail", "scores", "layer_budgets")):
        raise TypeError(f"policy must be a Policy instance (e.g. SnapKV(budget=128)), got {type(policy).__name__}")


def run_prefill(model: torch.nn.Module, input_ids: torch.Tensor, policy) -> tuple[Prefill, object]:
    """The prompt's prefill with ``policy``'s observer (and its tail, if it has one); a plain prefill for None."""
    if policy is None:
        return prefill(model, input_ids), None
    observer = policy.observer()
    return prefill(model, input_ids, [observer], tail=policy.tail(model)), observer


@dataclass
class Selection:
    """What eviction keeps of one prompt: the engine-neutral result of :func:`select_kv`.

    An engine that runs its own decoding loop (docs/serving.md) needs only this: per layer and KV
    head the kept prompt positions (ascending), the kept keys and values (post-RoPE, each at its
    original position), and the next-token logits. Decoding continues at position ``length``, the
    prompt's TRUE length, whatever number of entries was kept.
    """

    input_ids: torch.Tensor  # (1, L)
    kept: list[torch.Tensor] | None  # per layer (kv_heads, k) prompt positions, ascending; None = all of them
    cache: object  # DynamicCache of the kept entries: layer l holds (1, kv_heads, k_l, head_dim) keys and values
    logits: torch.Tensor  # (vocab,) next-token logits after the prompt
    stats: Stats
    observer: object = field(default=None, repr=False)  # the policy's prefill observer (a decode-time scorer may carry it on)

    @property
    def length(self) -> int:
        """The prompt's true length: the position of the first new token."""
        return self.input_ids.shape[1]

    @property
    def keys(self) -> list[torch.Tensor]:
        """Per layer the kept keys (kv_heads, k, head_dim), rotated at their original positions."""
        return [layer.keys[0] for layer in self.cache.layers]

    @property
    def values(self) -> list[torch.Tensor]:
        """Per layer the kept values (kv_heads, k, head_dim)."""
        return [layer.values[0] for layer in self.cache.layers]

    def positions(self) -> list[torch.Tensor]:
        """Per layer (kv_heads, k) kept prompt positions, also when everything was kept (``kept`` is None)."""
        if self.kept is not None:
            return self.kept
        return [torch.arange(k.shape[1], device=k.device).expand(k.shape[0], -1) for k in self.keys]


def select_kv(model: torch.nn.Module, input_ids: torch.Tensor, policy, *, max_new_tokens: int = 1, cap: int | None = None) -> Selection:
    """Prefill one prompt ``input_ids`` (1, L), score it with ``policy`` and keep its top entries per layer and KV head.

    The engine-neutral seam (docs/serving.md): no decoding happens here. ``policy=None`` keeps
    everything. ``max_new_tokens`` is only used to refuse eviction on sliding-window layers whose
    window the answer would pass.

    Examples
    --------
    >>> sel = select_kv(model, input_ids, SnapKV(budget=128))
    >>> sel.kept[0].shape, sel.keys[0].shape   # (kv_heads, 128), (kv_heads, 128, head_dim)
    >>> next_token = int(sel.logits.argmax())  # at position sel.length
    """
    if policy is not None:  # None keeps the whole cache (as FullKV does)
        check_policy(policy)
    input_ids = check_input_ids(model, input_ids)
    if policy is not None and getattr(policy, "evicts", True):  # eviction on sliding-window layers only within the window
        check_eviction_window(model, input_ids.shape[-1] + max(max_new_tokens, getattr(policy, "n_draft", 0) + 1) - 1)
    state, observer = run_prefill(model, input_ids, policy)
    before = kv_bytes(state.cache)
    done = compress(model, state, policy, observer, cap)
    stats = Stats(
        prompt_tokens=state.length,
        kept_per_layer=lengths(done.cache),
        kv_bytes_before=before,
        kv_bytes_after=kv_bytes(done.cache),
        prefill_seconds=state.seconds,
        eviction_seconds=done.score_seconds + done.evict_seconds,
        tail_rows=state.tail_rows,
    )
    del state.cache  # free the full cache (unless nothing was evicted: then it is the selection's)
    return Selection(state.input_ids, done.kept, done.cache, state.logits, stats, observer)


def check_max_new_tokens(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")


def generate_ids(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    policy,
    *,
    max_new_tokens: int = 64,
    sampling: Sampling = Sampling(),
    eos_token_ids=(),
    on_token: Callable[[int], None] | None = None,
    decode_budget: DecodeBudget | int | None = None,
) -> tuple[list[int], Stats, list[torch.Tensor] | None]:
    """Token-level pipeline: prefill ``input_ids`` (1, L), evict with ``policy``, decode.

    ``decode_budget`` (:class:`engine.rescore.DecodeBudget`, or an int ``n`` for ``DecodeBudget(n)``) also holds the cache under a budget
    while decoding, re-scored by the policy's decode-time scorer; ``stats.decode_eviction`` says what it did.
    """
    check_max_new_tokens(max_new_tokens)
    decode_budget = as_decode_budget(decode_budget)
    scorer = None if decode_budget is None else decode_scorer(policy, model)  # refused before any prefill
    selection = select_kv(model, input_ids, policy, max_new_tokens=max_new_tokens, cap=None if decode_budget is None else decode_budget.budget)
    stats = selection.stats
    budgeted = None
    if scorer is not None:
        budgeted = BudgetedDecoding(model, selection.cache, selection.kept, selection.length, decode_budget, scorer, observer=selection.observer)
        stats.decode_eviction = budgeted.record
    start = time.perf_counter()
    tokens = decode(
        model,
        selection.cache,
        selection.logits,
        selection.length,
        max_new_tokens,
        sampling=sampling,
        eos_token_ids=eos_token_ids,
        on_token=on_token,
        observers=budgeted.observers() if budgeted is not None else (),
        after_step=budgeted.after_step if budgeted is not None else None,
    )
    stats.decode_seconds = time.perf_counter() - start
    stats.new_tokens = len(tokens)
    return tokens, stats, selection.kept


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """Token ids (1, L) of ``prompt``, wrapped in the chat template when the tokenizer has one."""
    if not isinstance(prompt, str):
        kind = type(prompt).__name__
        hint = "call generate once per prompt, or generate_batch(model, tokenizer, prompts, policy) for several at once" if isinstance(prompt, (list, tuple)) else "give the prompt as text"
        raise TypeError(f"prompt must be a str, got {kind}: {hint}")
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty: give some text")
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    return torch.tensor([ids])


def eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompt: str,
    policy=None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = True,
    stream: Callable[[str], None] | None = None,
    decode_budget: int | None = None,
    interval: int = 32,
    recent: int = 32,
) -> Generation:
    """Answer ``prompt`` with the prompt's KV cache compressed by ``policy``.

    ``decode_budget`` holds the whole cache, prompt and answer, at or under that many entries per
    KV head while decoding: re-scored by the policy every ``interval`` tokens, the last
    ``min(recent, decode_budget // 2)`` entries always kept (:mod:`lookaheadkv.engine.rescore`).

    Examples
    --------
    >>> from lookaheadkv import load_model, generate, SnapKV
    >>> model, tokenizer = load_model()  # the bundled SmolLM2-135M-Instruct
    >>> out = generate(model, tokenizer, "Summarise: ...", policy=SnapKV(budget=128))
    >>> print(out.text, out.stats.line())
    """
    if policy is not None:  # None keeps the whole cache (as FullKV does)
        check_policy(policy)
    budget = None if decode_budget is None else DecodeBudget(decode_budget, interval, recent)
    sampling = Sampling(temperature, top_p, seed)
    input_ids = encode_prompt(tokenizer, prompt, chat)
    on_token = None
    if stream is not None:
        on_token = _streamer(tokenizer, stream)
    tokens, stats, kept = generate_ids(
        model,
        input_ids,
        policy,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_token_ids=eos_ids(model, tokenizer),
        on_token=on_token,
        decode_budget=budget,
    )
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if on_token is not None:
        on_token.flush()  # a generation cut inside a multi-byte character: emit what was held back
    return Generation(text, tokens, stats, kept)


def _streamer(tokenizer, stream: Callable[[str], None]) -> Callable[[int], None]:
    """Emit text as it becomes stable (decode the whole prefix, print the new suffix)."""
    tokens: list[int] = []
    printed = [0]

    def on_token(token: int) -> None:
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            stream(text[printed[0] :])
            printed[0] = len(text)

    def flush() -> None:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if len(text) > printed[0]:
            stream(text[printed[0] :])
            printed[0] = len(text)

    on_token.flush = flush
    return on_token
