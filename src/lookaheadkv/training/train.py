"""Train the lookahead modules to predict the model's true importance scores.

The whole loop is in :func:`train`, top to bottom. One sample's step is: a no-grad
prefill of the prompt (the frozen base model), then the n lookahead tokens with grad
over that cache; loss = mean over layers and heads of KL(s_GT || s_pred), both
L1-normalised over the prompt (docs/method.md, "Training").

The data is one data folder or the union of several (``--data a --data b``, e.g. a built
folder and its mid-answer cuts, :mod:`.midanswer`). Every checkpoint (and ``final/``) holds
``data-seen.json``: each folder's path, manifest and sample counts; a resume on another set
of folders is refused.

Runs as one CPU process by default, and data-parallel under ``torchrun`` or
``accelerate launch`` with no change: each rank takes every world-th micro-batch and
gradients are averaged with an all-reduce before each optimizer step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..engine.prefill import prefill
from ..lookahead import LookaheadModules
from ..policies import LookaheadKV, SharedPrefill, SnapKV
from ..records import append_record, read_records
from .data import TargetDataset

EPS = 1e-10
DATA_SEEN = "data-seen.json"
SHAPE_FIELDS = ("n_lookahead", "rank", "alpha")


class TrainingError(ValueError):
    """Training cannot go on (a non-finite loss or gradient, a resume that changes the run's shape)."""


@dataclass
class TrainConfig:
    """Settings of a training run (saved beside its checkpoints).

    ``data``: one data folder, or a list of folders whose union is trained on (in that order).
    """

    data: str | list[str]
    out: str
    steps: int = 200
    batch: int = 8  # samples per optimizer step, over all ranks (gradient accumulation)
    lr: float = 1e-3
    schedule: str = "constant"  # or "cosine"
    warmup: int = 0
    clip: float = 1.0
    seed: int = 0
    n_lookahead: int = 32
    rank: int = 8
    alpha: float = 32.0
    eval_every: int = 25
    eval_samples: int = 16
    save_every: int = 25
    budgets: list[int] = field(default_factory=lambda: [64, 128, 256])
    init: str | None = None  # when ``out`` holds no checkpoint: a checkpoint folder to carry on, or saved modules to start from
    answered_only: bool = False  # drop samples whose checkable answer missed an asked value (TargetDataset)

    def __post_init__(self):
        if self.steps < 1 or self.batch < 1 or self.lr <= 0:
            raise ValueError(f"steps and batch must be >= 1 and lr > 0, got {self.steps}, {self.batch}, {self.lr}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not self.folders:
            raise ValueError("no data folder given: give --data FOLDER (made by 'lookaheadkv data build')")

    @property
    def folders(self) -> list[str]:
        """The data folders, as a list (one for a single ``data``)."""
        return [str(self.data)] if isinstance(self.data, (str, os.PathLike)) else [str(d) for d in self.data]


def kl_loss(pred_mass: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over layers and heads of KL(labels || pred), pred L1-normalised over the prompt."""
    pred = pred_mass / pred_mass.sum(dim=-1, keepdim=True)
    kl = labels * (torch.log(labels + EPS) - torch.log(pred + EPS))
    return kl.sum(dim=-1).mean()


def sample_loss(model, modules: LookaheadModules, item: dict) -> torch.Tensor:
    state = prefill(model, item["prompt_ids"][None])  # frozen base model, no grad
    with torch.enable_grad():
        mass = torch.stack(modules.attention_mass(model, state.cache, state.length))  # (layers, heads, L)
    return kl_loss(mass.float(), item["labels"].to(mass.device))


def learning_rate(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr


def sample_order(n: int, seed: int, index: int) -> int:
    """The sample seen at global micro-batch ``index``: a fresh seeded permutation each epoch."""
    epoch, offset = divmod(index, n)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return int(torch.randperm(n, generator=g)[offset])


@torch.no_grad()
def heldout_recall(model, modules: LookaheadModules, items: list[dict], budgets: list[int]) -> dict:
    """Recall@budget of LookaheadKV and SnapKV on the same held-out samples."""
    sums = {f"{m}@{b}": 0.0 for m in ("lookahead", "snapkv") for b in budgets}
    policies = {"snapkv": SnapKV(), "lookahead": LookaheadKV(modules=modules)}
    for item in items:
        for key, value in SharedPrefill(model, item["prompt_ids"][None], policies, truth=item["labels"]).recall(budgets).items():
            sums[key] += value
    return {k: v / max(1, len(items)) for k, v in sums.items()}


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def data_seen(train_set: TargetDataset, heldout: TargetDataset) -> dict:
    """What a run trains on: per data folder its path, manifest and train / held-out sample counts."""
    return {
        "folders": [
            {"folder": str(f), "manifest": m, "train_samples": a, "heldout_samples": b}
            for f, m, a, b in zip(train_set.folders, train_set.manifests, train_set.counts, heldout.counts)
        ]
    }


def save_checkpoint(folder: Path, modules: LookaheadModules, optimizer: torch.optim.Optimizer, step: int, data: dict | None = None) -> None:
    """Write the modules, the optimizer state, the step and (``data``) the :func:`data_seen` record, atomically."""
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash while it was written: never mix its files with these
    modules.save_pretrained(tmp)
    if data is not None:
        (tmp / DATA_SEEN).write_text(json.dumps(data, indent=2) + "\n")
    state = {}
    for i, s in optimizer.state_dict()["state"].items():
        for k, v in s.items():
            state[f"{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    save_file(state, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step}) + "\n")
    # a crash from here on leaves a whole checkpoint in ``folder`` or, between the renames, in ``old``
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


def load_checkpoint(folder: Path, model, optimizer_factory) -> tuple[LookaheadModules, torch.optim.Optimizer, int]:
    modules = LookaheadModules.from_pretrained(folder, device=model.device)
    optimizer = optimizer_factory(modules)
    flat = load_file(str(folder / "optimizer.safetensors"))
    state = optimizer.state_dict()
    for key, value in flat.items():
        i, name = key.split(".", 1)
        state["state"].setdefault(int(i), {})[name] = value.to(model.device) if name != "step" else value
    optimizer.load_state_dict(state)
    return modules, optimizer, json.loads((folder / "state.json").read_text())["step"]


def train(model, cfg: TrainConfig, *, progress: bool = True) -> LookaheadModules:
    """Train (or resume training) lookahead modules for ``model`` on ``cfg.data`` (one folder or several); returns them."""
    rank, world = _distributed()
    out = Path(cfg.out)
    checkpoint = out / "checkpoint"
    train_set = TargetDataset(cfg.folders, "train", answered_only=cfg.answered_only)
    heldout = TargetDataset(cfg.folders, "heldout", answered_only=cfg.answered_only)
    if len(train_set) == 0:
        raise ValueError(f"{', '.join(cfg.folders)} has no training samples yet: run 'lookaheadkv data build' first")
    heldout_items = [heldout[i] for i in heldout.spread(cfg.eval_samples)]  # from each folder in turn
    seen = data_seen(train_set, heldout)

    def make_optimizer(mods):
        return torch.optim.Adam(mods.parameters(), lr=cfg.lr)

    # a crash between save_checkpoint's two renames leaves only the previous checkpoint, as ".old"
    resume = checkpoint if checkpoint.exists() else checkpoint.with_name(checkpoint.name + ".old")
    warm = None
    if not resume.exists() and cfg.init is not None:
        init = Path(cfg.init)
        if (init / "state.json").exists():
            resume = init  # another machine's checkpoint: its modules, optimizer and step
        elif (init / "config.json").exists():
            warm = init  # saved modules (e.g. the shipped ones): start from them with a fresh optimizer at step 0
        else:
            raise FileNotFoundError(f"--init {init} is neither a training checkpoint (state.json) nor saved modules (config.json)")
    if resume.exists():
        modules, optimizer, start = load_checkpoint(resume, model, make_optimizer)
        _check_same_shape(modules, cfg, resume)
        _check_same_data(resume, seen)
    elif warm is not None:
        modules = LookaheadModules.from_pretrained(warm, device=model.device)
        _check_same_shape(modules, cfg, warm)
        optimizer, start = make_optimizer(modules), 0
    else:
        torch.manual_seed(cfg.seed)
        modules = LookaheadModules.for_model(model, seed=cfg.seed, n_lookahead=cfg.n_lookahead, rank=cfg.rank, alpha=cfg.alpha)
        optimizer, start = make_optimizer(modules), 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        _truncate_log(out / "log.jsonl", start)

    bar = _Progress(cfg.steps, start, enabled=progress and rank == 0)
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=False)
        local = 0.0
        for micro in range(rank, cfg.batch, world):
            item = train_set[sample_order(len(train_set), cfg.seed, step * cfg.batch + micro)]
            loss = sample_loss(model, modules, item)
            if not torch.isfinite(loss):
                raise TrainingError(f"non-finite loss ({loss.item()}) at step {step + 1} on sample {item['id']}; nothing was saved after step {start}: check that sample's file")
            (loss / cfg.batch).backward()
            local += loss.item()
        if world > 1:
            for p in modules.parameters():
                if p.grad is None:
                    # no gradient here: the rank had no micro-batch, or the parameter never reaches
                    # the loss (the last layer's value/output/MLP adapters); every rank must still
                    # join each all-reduce, and a zero gradient leaves Adam's update at zero
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
            total = torch.tensor([local])
            dist.all_reduce(total)
            local = total.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(modules.parameters(), cfg.clip if cfg.clip > 0 else math.inf).item()
        if not math.isfinite(grad_norm):
            raise TrainingError(f"non-finite gradient norm at step {step + 1}; nothing was saved after step {start}: lower --lr or check the data")
        optimizer.step()
        record = {"step": step + 1, "loss": local / cfg.batch, "lr": lr, "grad_norm": grad_norm, "seconds": time.perf_counter() - t0}
        if rank == 0 and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps) and heldout_items:
            record["heldout"] = heldout_recall(model, modules, heldout_items, cfg.budgets)
        if rank == 0:
            append_record(out / "log.jsonl", record)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                save_checkpoint(checkpoint, modules, optimizer, step + 1, seen)
        bar.update(step + 1, record)
    bar.close()
    if rank == 0:
        from .report import plot_log

        modules.save_pretrained(out / "final")
        (out / "final" / DATA_SEEN).write_text(json.dumps(seen, indent=2) + "\n")
        plot_log(out)
    return modules


def _check_same_shape(modules: LookaheadModules, cfg: TrainConfig, folder: Path) -> None:
    """Refuse to resume a checkpoint with other module settings than this run asks for."""
    diffs = [f"{k}={getattr(modules.config, k)} (asked: {getattr(cfg, k)})" for k in SHAPE_FIELDS if getattr(modules.config, k) != getattr(cfg, k)]
    if diffs:
        raise TrainingError(f"{folder} was trained with {', '.join(diffs)}: resume with the same settings or use a new --out folder")


def _check_same_data(folder: Path, seen: dict) -> None:
    """Refuse to resume a checkpoint trained on other data folders (compared by their manifests, in order)."""
    path = folder / DATA_SEEN
    if not path.exists():
        return  # a checkpoint saved before the data was recorded
    old = json.loads(path.read_text())["folders"]
    if [f["manifest"] for f in old] != [f["manifest"] for f in seen["folders"]]:
        was, asked = " ".join(f["folder"] for f in old), " ".join(f["folder"] for f in seen["folders"])
        if was == asked:
            raise TrainingError(f"{folder} was trained on --data {was}, whose manifest has changed since (built again with other settings): use a new --out folder")
        raise TrainingError(f"{folder} was trained on --data {was} (asked: {asked}): resume with the same data folders in the same order, or use a new --out folder")


def _truncate_log(path: Path, step: int) -> None:
    """Keep only the log records up to ``step`` so a resumed run's log reads as one run (a cut line is dropped)."""
    if not path.exists():
        return
    rows = [r for r in read_records(path) if r.get("step", math.inf) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


class _Progress:
    def __init__(self, total: int, done: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"), TimeRemainingColumn())
        self.task = self.progress.add_task("train", total=total, completed=done, info="")
        self.progress.start()

    def update(self, step: int, record: dict) -> None:
        if self.enabled:
            info = f"loss {record['loss']:.4f}"
            if "heldout" in record:
                h = record["heldout"]
                info += " | recall@128 lookahead {:.3f} snapkv {:.3f}".format(h.get("lookahead@128", float("nan")), h.get("snapkv@128", float("nan")))
            self.progress.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
