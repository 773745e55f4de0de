"""Raw material for the synthetic suite: essays, filler, needle vocabularies, per split.

Everything a sample draws (haystack essays, filler sentences, needle keys and values)
comes from a :class:`SplitPools` of its split, and the train and eval pools share no
essay, filler sentence, word or value range. A train sample and an eval sample can
therefore never carry the same needle, whatever their seeds.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath

from lookaheadkv.models import load_essays

SPLITS = ("eval", "train")

# RULER's noise haystack for eval; an analogue of the same shape for train.
_NOISE = {
    "eval": "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "train": "The river is wide. The hill is tall. The moon is white. Off we go. Round and round once more.",
}

_FIRST_NAMES = (
    "Alice Bruno Clara Dmitri Elena Farid Greta Hugo Ingrid Jonas Keiko Lars Mara Nikolai "
    "Olga Pedro Quinn Rosa Stefan Tara Umar Vera Walter Xenia Yusuf Zora Anton Bianca "
    "Cyrus Delia Emil Fiona Gustav Hanna Ivo Julia Kamal Lena Milo Nadia"
).split()
_LAST_NAMES = (
    "Abbott Brennan Castillo Dvorak Eriksen Fontaine Galloway Halvorsen Ibarra Jansen "
    "Kowalski Lindqvist Moreau Nakamura Okafor Petrov Quintero Rasmussen Sorensen Tanaka "
    "Ulrich Valdez Whitfield Xavier Yamada Zielinski Albrecht Bergman Caruso Delgado "
    "Eklund Fischer Gruber Hartmann Iversen Jovanovic Keller Lorenz Marchetti Novak"
).split()
_CITIES = (
    "Lisbon Oslo Nairobi Toronto Krakow Seville Melbourne Dublin Helsinki Lima Porto Zagreb "
    "Montreal Bergen Valencia Auckland Glasgow Tallinn Quito Adelaide Geneva Bologna Leeds "
    "Riga Marseille Denver Gdansk Tampere Cordoba Halifax Lyon Antwerp Bilbao Perth Graz "
    "Utrecht Malmo Turin Brno Calgary"
).split()
_PROFESSIONS = (
    "carpenter dentist pilot baker surgeon librarian plumber architect chemist florist "
    "journalist electrician veterinarian sculptor accountant gardener pharmacist tailor "
    "astronomer locksmith economist butcher geologist jeweler translator blacksmith "
    "optician welder historian potter mechanic beekeeper cartographer glassblower "
    "firefighter violinist zoologist bookbinder winemaker photographer"
).split()

# Words of the task templates: never needle words, so that echoing the question
# cannot produce an answer.
TEMPLATE_WORDS = frozenset(
    "special magic numbers number words word uuids uuid hidden within following text "
    "memorize quiz afterwards mentioned provided below numbered appear often others "
    "common question answer coded track frequency frequently appeared three ignore dots "
    "explanation variable variables assignment chain chains assigned value values "
    "notes people person lives works city profession which does".split()
)


@functools.lru_cache(maxsize=1)
def essays() -> tuple[tuple[str, str], ...]:
    """The Paul Graham essays as ``(name, text)`` pairs sorted by name (read once)."""
    return tuple(load_essays())


def clean_text(text: str) -> str:
    """Collapse whitespace and restore the space lost between sentences ("end.Next")."""
    text = re.sub(r"([a-z][.!?])([A-Z])", r"\1 \2", text)
    return " ".join(text.split())


def split_sentences(text: str) -> list[str]:
    """Split on whitespace that follows '.', '!' or '?'."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


@functools.lru_cache(maxsize=1)
def _essay_vocabulary() -> tuple[str, ...]:
    """Sorted lower-case words of 5-10 letters from all essays, minus template words."""
    words: set[str] = set()
    for _, text in essays():
        words.update(re.findall(r"\b[a-z]{5,10}\b", text.lower()))
    return tuple(sorted(words - TEMPLATE_WORDS))


def _side(split: str) -> int:
    """0 for eval, 1 for train."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


def is_train_essay(name: str) -> bool:
    """Whether an essay belongs to the training half: the first byte of sha256(stem) is even.

    The one rule that splits the bundled essays, shared by this suite (its "train" and
    "eval" haystacks) and the training prompt sources; ``name`` may be a stem
    (``"addiction"``), a file name or a path.
    """
    stem = PurePath(name).name.removesuffix(".txt")
    return hashlib.sha256(stem.encode("utf-8")).digest()[0] % 2 == 0


def _halve(items: Sequence[str], side: int) -> tuple[str, ...]:
    """Every other item, starting at ``side``."""
    return tuple(items[side::2])


@dataclass(frozen=True)
class SplitPools:
    """All values one split may draw from; the two splits' pools are disjoint.

    Attributes
    ----------
    split
        "eval" or "train".
    essays
        Cleaned essay texts, split by :func:`is_train_essay` (eval: 21 essays, train: 28).
    noise
        The five-sentence filler paragraph of the noise haystack.
    vocab
        Needle / list words: essay words whose CRC32 parity equals the split side.
    number_range, short_number_range
        Inclusive ranges of 7-digit needle values and 5-digit variable values.
    uuid_first_hex, letters
        First hex digit of UUID needles; first letter of variable names and coded words.
    first_names, last_names, cities, professions
        Fact vocabularies of ``passage_qa`` (alternate halves of fixed lists).
    """

    split: str
    essays: tuple[str, ...]
    noise: str
    vocab: tuple[str, ...]
    number_range: tuple[int, int]
    short_number_range: tuple[int, int]
    uuid_first_hex: str
    letters: str
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    cities: tuple[str, ...]
    professions: tuple[str, ...]


@functools.lru_cache(maxsize=None)
def split_pools(split: str) -> SplitPools:
    """The :class:`SplitPools` of ``split`` ("eval" or "train")."""
    side = _side(split)
    return SplitPools(
        split=split,
        essays=tuple(clean_text(text) for name, text in essays() if is_train_essay(name) == (split == "train")),
        noise=_NOISE[split],
        vocab=tuple(w for w in _essay_vocabulary() if zlib.crc32(w.encode()) % 2 == side),
        number_range=((1_000_000, 5_499_999), (5_500_000, 9_999_999))[side],
        short_number_range=((10_000, 54_999), (55_000, 99_999))[side],
        uuid_first_hex=("01234567", "89abcdef")[side],
        letters=("ABCDEFGHIJKLM", "NOPQRSTUVWXYZ")[side],
        first_names=_halve(_FIRST_NAMES, side),
        last_names=_halve(_LAST_NAMES, side),
        cities=_halve(_CITIES, side),
        professions=_halve(_PROFESSIONS, side),
    )


def draw_number(rng: random.Random, pools: SplitPools) -> str:
    """A 7-digit number from the split's range."""
    return str(rng.randint(*pools.number_range))


def draw_uuid(rng: random.Random, pools: SplitPools) -> str:
    """A UUID-shaped hex string whose first digit comes from the split's half."""
    digits = rng.choice(pools.uuid_first_hex) + f"{rng.getrandbits(124):031x}"
    return "-".join(digits[a:b] for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32)))


def draw_words(rng: random.Random, pools: SplitPools, k: int) -> list[str]:
    """``k`` distinct vocabulary words."""
    return rng.sample(pools.vocab, k)


def draw_keys(rng: random.Random, pools: SplitPools, k: int) -> list[str]:
    """``k`` distinct RULER-style keys "word-word"."""
    words = draw_words(rng, pools, 2 * k)
    return [f"{a}-{b}" for a, b in zip(words[::2], words[1::2])]


def draw_variable_names(rng: random.Random, pools: SplitPools, k: int) -> list[str]:
    """``k`` distinct 5-letter upper-case names starting with a letter of the split's half."""
    names: set[str] = set()
    while len(names) < k:
        rest = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4))
        names.add(rng.choice(pools.letters) + rest)
    return sorted(names)


def draw_coded_words(rng: random.Random, pools: SplitPools, k: int) -> list[str]:
    """``k`` distinct 6-letter lower-case "coded" words (first letter from the split's half)."""
    words: set[str] = set()
    while len(words) < k:
        rest = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
        words.add(rng.choice(pools.letters.lower()) + rest)
    return sorted(words)


def essay_stream(rng: random.Random, pools: SplitPools) -> list[str]:
    """The split's essays in a random order, as one list of words."""
    order = list(pools.essays)
    rng.shuffle(order)
    return " ".join(order).split()


def take_words(words: Sequence[str], n: int) -> str:
    """The first ``n`` words of ``words`` (cycled when ``n`` exceeds its length)."""
    return " ".join(itertools.islice(itertools.cycle(words), n))


def noise_haystack(pools: SplitPools, n_paragraphs: int) -> str:
    """The split's filler paragraph repeated ``n_paragraphs`` times."""
    return " ".join([pools.noise] * n_paragraphs)


def insert_at_depths(text: str, inserts: Sequence[tuple[float, str]]) -> str:
    """Insert sentences into ``text`` at sentence boundaries.

    Parameters
    ----------
    text
        The haystack.
    inserts
        ``(depth, sentence)`` pairs, depth in [0, 1] (0: before the first sentence,
        1: after the last). Pairs at the same boundary keep their given order.
    """
    sentences = split_sentences(text)
    slots: dict[int, list[str]] = {}
    for depth, sentence in inserts:
        slots.setdefault(round(depth * len(sentences)), []).append(sentence)
    out: list[str] = []
    for i in range(len(sentences) + 1):
        out.extend(slots.get(i, []))
        if i < len(sentences):
            out.append(sentences[i])
    return " ".join(out)
