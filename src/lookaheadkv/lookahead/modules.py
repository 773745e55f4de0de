"""The learned lookahead modules: n soft tokens plus LoRA adapters active only on them.

The modules never touch the prompt. They run in one of two ways:

* in the prompt's own prefill (:meth:`LookaheadModules.tail`, the paper's setting and the
  inference default): one forward over ``[prompt ; lookahead tokens]`` whose adapters act
  only on the last n rows. The prompt's rows are computed by the base model's layers alone,
  but inside matmuls that also hold the n extra rows, so their keys, values and logits can
  differ from a plain prefill's in the last float bits (how a BLAS splits a matmul may depend
  on its row count); the attention kernel sees exactly the prompt's own tensors.
* in a separate forward over the prompt's finished cache (:meth:`attention_mass`, used by
  training and by runs that share one prefill between methods): the prompt is prefilled by
  the unchanged base model, so its keys, values and the next-token logits are bit-identical
  with or without the modules.

Either way the adapters are hooked onto the model's linear layers only for that forward and
removed after, and decoding pays nothing for them.
"""

from __future__ import annotations

import hashlib
import json
import math
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..engine.prefill import Tail, extend
from ..scoring import AttentionMass

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"  # shipped inside the package
BUNDLED_WEIGHTS = {"smollm2-135m-instruct": WEIGHTS_DIR / "smollm2-135m-instruct"}


def default_modules_path(model) -> Path | None:
    """Shipped modules for ``model`` when it is one we trained for, else None."""
    name = (getattr(model.config, "_name_or_path", "") or "").lower()
    for key, path in BUNDLED_WEIGHTS.items():
        if key in name and (path / "model.safetensors").is_file():
            return path
    return None


class ModulesError(ValueError):
    """Modules that cannot be used: wrong model, corrupted or missing files."""


def base_shape(model: nn.Module) -> dict:
    c = model.config
    return {
        "model_type": c.model_type,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
    }


def target_linears(model: nn.Module, targets, layers) -> dict[str, nn.Linear]:
    """The model's linear layers to adapt, keyed ``"{layer}.{name}"`` (e.g. ``"3.q_proj"``)."""
    found = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if not isinstance(module, nn.Linear) or parts[-1] not in targets or "layers" not in parts:
            continue
        layer = int(parts[parts.index("layers") + 1])
        if layers is None or layer in layers:
            found[f"{layer}.{parts[-1]}"] = module
    return found


@dataclass
class LookaheadConfig:
    """Everything needed to rebuild the modules and check that they fit a model."""

    n_lookahead: int = 32
    rank: int = 8
    alpha: float = 32.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    layers: list[int] | None = None  # None = every decoder layer
    base_model: str = ""
    base_shape: dict = field(default_factory=dict)
    linear_shapes: dict = field(default_factory=dict)  # "3.q_proj" -> [in_features, out_features]
    format_version: int = FORMAT_VERSION
    weights_sha256: str = ""

    def __post_init__(self):
        for name in ("n_lookahead", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        unknown = set(self.target_modules) - set(DEFAULT_TARGETS)
        if unknown:
            raise ValueError(f"unknown target modules {sorted(unknown)}; choose from {', '.join(DEFAULT_TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _key(name: str) -> str:
    return name.replace(".", "_")


class LookaheadModules(nn.Module):
    """Soft lookahead tokens ``P`` (n, hidden) and rank-r LoRA pairs for the target linears.

    Build them for a model with :meth:`for_model`, load trained ones with
    :meth:`from_pretrained`, and score a prompt with :meth:`attention_mass`.

    Initialisation (``for_model``): each lookahead token is drawn from a Gaussian with the
    per-dimension mean and standard deviation of the model's input embedding table, so the
    tokens start inside the distribution of real token embeddings (a unit Gaussian would be
    far off-scale, zeros would make all n tokens identical). LoRA ``A`` takes nn.Linear's
    default (Kaiming-uniform) init and ``B`` starts at zero, so untrained adapters change
    nothing and training starts from "soft tokens over the base model".
    """

    def __init__(self, config: LookaheadConfig):
        super().__init__()
        self.config = config
        hidden = config.base_shape["hidden_size"]
        self.tokens = nn.Parameter(torch.zeros(config.n_lookahead, hidden))
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (fan_in, fan_out) in sorted(config.linear_shapes.items()):
            self.lora_A[_key(name)] = nn.Parameter(torch.zeros(config.rank, fan_in))
            self.lora_B[_key(name)] = nn.Parameter(torch.zeros(fan_out, config.rank))

    # ---------------------------------------------------------------- construction
    @classmethod
    def for_model(cls, model: nn.Module, *, seed: int = 0, **settings) -> "LookaheadModules":
        """Randomly initialised modules shaped for ``model`` (settings: see LookaheadConfig)."""
        config = LookaheadConfig(**settings)
        linears = target_linears(model, config.target_modules, config.layers)
        if not linears:
            raise ModulesError(f"no linear layers named {config.target_modules} found in {type(model).__name__}")
        config.linear_shapes = {k: [m.in_features, m.out_features] for k, m in linears.items()}
        config.base_shape = base_shape(model)
        config.base_model = getattr(model.config, "_name_or_path", "") or ""
        modules = cls(config)
        g = torch.Generator().manual_seed(seed)  # drawn on the CPU, so the same seed gives the same modules everywhere
        embed = model.get_input_embeddings().weight.detach().float().cpu()
        mean, std = embed.mean(0), embed.std(0)
        with torch.no_grad():
            noise = torch.randn(config.n_lookahead, embed.shape[1], generator=g)
            modules.tokens.copy_(mean + std * noise)
            for a in modules.lora_A.values():
                bound = 1 / math.sqrt(a.shape[1])  # nn.Linear's default Kaiming-uniform bound
                a.copy_(torch.rand(a.shape, generator=g) * 2 * bound - bound)
        return modules.to(model.device)

    # ---------------------------------------------------------------- use
    def check_fits(self, model: nn.Module) -> None:
        """Raise ModulesError naming both shapes if these modules were made for another model."""
        mine, theirs = self.config.base_shape, base_shape(model)
        diffs = [k for k in SHAPE_KEYS if k != "model_type" and mine.get(k) != theirs.get(k)]
        if diffs:
            fmt = lambda s: ", ".join(f"{k}={s.get(k)}" for k in diffs)  # noqa: E731
            raise ModulesError(f"these lookahead modules were made for a model with {fmt(mine)}; this model has {fmt(theirs)}")
        linears = target_linears(model, self.config.target_modules, self.config.layers)
        for name, (fan_in, fan_out) in self.config.linear_shapes.items():
            if name not in linears or (linears[name].in_features, linears[name].out_features) != (fan_in, fan_out):
                got = linears.get(name)
                got_txt = "missing" if got is None else f"{got.in_features}x{got.out_features}"
                raise ModulesError(f"layer {name}: modules expect {fan_in}x{fan_out}, the model has {got_txt}")

    def _linears(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The target linears of ``model``, checked once per model and remembered."""
        cached = getattr(self, "_fitted", None)
        if cached is None or cached[0]() is not model:
            self.check_fits(model)
            linears = target_linears(model, self.config.target_modules, self.config.layers)
            self._fitted = (weakref.ref(model), linears)
        return self._fitted[1]

    @contextmanager
    def applied(self, model: nn.Module, last: int | None = None) -> Iterator[None]:
        """Hook the LoRA adapters onto ``model``'s linears for the duration of the block.

        ``last``: adapt only the last ``last`` positions of every call (the lookahead tokens at
        the end of a prefill); None adapts every position.
        """
        linears = self._linears(model)
        handles = [linears[name].register_forward_hook(self._hook(_key(name), last)) for name in self.config.linear_shapes]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, key: str, last: int | None = None):
        # views of the parameters, taken inside the block so gradients reach lora_A / lora_B when
        # training; the scaling multiplies the rank-r intermediate (or is addmm's alpha), never a
        # copy of B
        a_t, b_t, scaling = self.lora_A[key].T, self.lora_B[key].T, self.config.scaling

        def add_lora(module, args, output):
            x, rows, grad = args[0], output, torch.is_grad_enabled()
            if last is not None:
                if grad:
                    raise RuntimeError("adapters on the last positions only are for inference (no grad)")
                x, rows = x[:, -last:], output[:, -last:]  # updated in place below: the prompt's rows untouched
            if not grad and rows.dim() == 3 and rows.shape[0] == 1 and x.dtype == a_t.dtype == rows.dtype:
                rows[0].addmm_(x[0] @ a_t, b_t, alpha=scaling)  # inference: one fused multiply-add, no temporary
                return output
            delta = (((x.to(a_t.dtype) @ a_t) * scaling) @ b_t).to(output.dtype)
            if grad:  # training: out of place, so autograd sees the adapters
                return output + delta
            rows.add_(delta)
            return output

        return add_lora

    def tail(self, model: nn.Module) -> Tail:
        """The lookahead tokens as a :class:`~lookaheadkv.engine.prefill.Tail` of the prompt's prefill.

        ``prefill(model, ids, tail=modules.tail(model))`` runs prompt and lookahead tokens in one
        forward (adapters on the lookahead rows only); its ``tail_mass`` is what
        :meth:`attention_mass` returns for the same prompt, up to float rounding.
        """
        self._linears(model)  # check the fit before the forward
        n = self.config.n_lookahead
        return Tail(self.tokens[None].detach().to(model.dtype), AttentionMass(), lambda: self.applied(model, last=n))

    def attention_mass(self, model: nn.Module, cache, prompt_len: int, position: int | None = None) -> list[torch.Tensor]:
        """Run the lookahead tokens over a prompt's cache: per layer (heads, L) attention summed over the n tokens.

        The cache is left as it was. Differentiable with respect to the modules when grad is enabled.
        ``position``: the tokens' first true position when the cache holds fewer entries than
        positions (decode-time re-scoring of an evicted cache: the next token's position).
        """
        observer = AttentionMass()
        embeds = self.tokens[None].to(model.dtype)  # (1, n, hidden)
        with self.applied(model):
            extend(model, cache, prompt_len, inputs_embeds=embeds, observers=[observer], position=position)
        return observer.per_layer()

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------- save / load
    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into the folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        weights = path / WEIGHTS_NAME
        save_file(tensors, str(weights), metadata={"format": "pt", "lookaheadkv_format": str(FORMAT_VERSION)})
        self.config.weights_sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
        (path / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, *, device: str | torch.device = "cpu") -> "LookaheadModules":
        """Load modules from a local folder, or from a Hugging Face Hub repository id."""
        folder = _resolve_folder(path_or_hub_id)
        config = _read_config(folder)
        modules = cls(config)
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise ModulesError(f"{folder} has no {WEIGHTS_NAME}: save modules with save_pretrained")
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        if config.weights_sha256 and digest != config.weights_sha256:
            raise ModulesError(f"{weights} is corrupted (checksum differs from config.json): re-download or re-train it")
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as err:
            raise ModulesError(f"{weights} is truncated or corrupted ({err}): re-download or re-train it") from None
        expected = modules.state_dict()
        bad = [k for k in expected if k not in tensors or tensors[k].shape != expected[k].shape]
        if bad or set(tensors) - set(expected):
            raise ModulesError(f"{weights} does not match its config.json (e.g. {(bad or sorted(set(tensors) - set(expected)))[0]})")
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise ModulesError(f"{weights} holds NaN or infinite values: re-train it")
        modules.load_state_dict(tensors)
        return modules.to(device)


def _resolve_folder(path_or_hub_id: str | Path) -> Path:
    folder = Path(path_or_hub_id).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise ModulesError(f"{folder} is a file; give the folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        return folder
    text = str(path_or_hub_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise ModulesError(f"no lookahead modules at {text}: give a folder written by save_pretrained or a hub id 'org/name'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    except Exception as err:  # offline, missing repo, auth: all end the same way for the user
        raise ModulesError(f"could not fetch lookahead modules {text!r} from the hub ({type(err).__name__}); give a local folder") from None


def _read_config(folder: Path) -> LookaheadConfig:
    try:
        raw = json.loads((folder / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise ModulesError(f"{folder} has no {CONFIG_NAME}: save modules with save_pretrained") from None
    except json.JSONDecodeError as err:
        raise ModulesError(f"{folder / CONFIG_NAME} is not valid JSON ({err.msg} at line {err.lineno})") from None
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ModulesError(f"{folder} has format version {version}; this lookaheadkv reads version {FORMAT_VERSION}")
    known = set(LookaheadConfig.__dataclass_fields__)
    return LookaheadConfig(**{k: v for k, v in raw.items() if k in known})
