"""Eviction cost of every method on the CPU: time to first token, added time, peak memory, ratio LAQ / LookaheadKV.

The same benchmark as ``lookaheadkv bench`` (the code lives in :mod:`lookaheadkv.bench.cost`).
Usage::

    python benchmarks/cost.py --out runs/bench-cost                   # SmolLM2, 1K-8K tokens, all methods
    python benchmarks/cost.py --lengths 1024,2048 --methods snapkv,lookahead,laq --reps 5
    python benchmarks/cost.py --model tiny --lengths 256,512 --reps 1 --no-memory --out /tmp/cost

It writes ``results.json``, ``table.md`` and ``cost.png`` (added ms against prompt length,
log scale) into ``--out`` and prints the table. SpecKV drafts with SmolLM2 itself (it has no
smaller sibling); LookaheadKV uses random modules when none are shipped (same cost).
"""

from lookaheadkv.bench.cost import main

if __name__ == "__main__":
    main()
