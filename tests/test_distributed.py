"""Data-parallel training: two CPU processes (gloo, forked by ``torch.multiprocessing``).

Each rank takes every second micro-batch and gradients are all-reduced before every optimizer
step, so after a few steps

* both ranks hold the same modules, and they moved away from the initial ones;
* they equal a single-process run with the same global batch (gradient averaging is right):
  same weights, same logged losses and gradient norms, same Adam moments;
* an uneven split (3 micro-batches on 2 ranks) and a rank with no micro-batch at all (batch 1)
  work too.

The ranks are forked rather than started by ``torchrun``: they inherit the test process's
imports, which saves 10-30 s per rank on a busy 2-core machine. They rendezvous exactly as under
``torchrun`` (env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from helpers import single_thread  # noqa: F401
from lookaheadkv.lookahead import LookaheadModules
from lookaheadkv.models import tiny_model
from lookaheadkv.training.data import PromptRecord, build
from lookaheadkv.training.train import TrainConfig, train

STEPS = 3
TIMEOUT_S = 120
# (name, batch): 3 micro-batches split 2 + 1 over the ranks; 1 leaves rank 1 without one
RUNS = (("uneven", 3), ("lonely", 1))


def worker(rank: int, world: int, port: int, data: str, root: str) -> None:
    """One rank, forked from the test process (so it inherits the imports: no 10 s start-up)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model = tiny_model("llama", initializer_range=0.2)
    try:
        for name, batch in RUNS:
            modules = train(model, config(Path(data), Path(root) / name, batch), progress=False)
            state = {k: v.detach().contiguous() for k, v in modules.state_dict().items()}
            save_file(state, f"{root}/{name}-rank{rank}.safetensors")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def config(data: Path, out: Path, batch: int) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), steps=STEPS, batch=batch, lr=1e-2, n_lookahead=4, rank=4, eval_every=0, save_every=1000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logged(out: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", initializer_range=0.2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, model):
    g = torch.Generator().manual_seed(0)
    records = [PromptRecord(f"id{i}", "synthetic", torch.randint(3, 256, (int(torch.randint(20, 32, (1,), generator=g)),), generator=g).tolist()) for i in range(8)]
    out = tmp_path_factory.mktemp("ddp-data")
    build(model, records, out, max_new_tokens=6, eos_token_ids=[2], model_name="tiny-llama")
    return out


@pytest.fixture(scope="module")
def ddp_root(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("ddp")
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        ranks = mp.start_processes(worker, args=(2, free_port(), str(data_dir), str(root)), nprocs=2, join=False, start_method="fork")
        deadline = time.monotonic() + TIMEOUT_S
        while not ranks.join(timeout=1):  # raises if a rank failed
            if time.monotonic() > deadline:
                for process in ranks.processes:
                    process.kill()
                pytest.fail(f"the two ranks did not finish within {TIMEOUT_S} s (hung all-reduce?)")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return root


@pytest.mark.parametrize("name,batch", RUNS)
def test_ranks_agree_and_match_a_single_process(ddp_root, data_dir, model, tmp_path, name, batch):
    rank0 = load_file(str(ddp_root / f"{name}-rank0.safetensors"))
    rank1 = load_file(str(ddp_root / f"{name}-rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    for k in rank0:
        torch.testing.assert_close(rank1[k], rank0[k], atol=0, rtol=0, msg=f"ranks disagree on {k}")

    init = LookaheadModules.for_model(model, seed=0, n_lookahead=4, rank=4).state_dict()
    assert (rank0["tokens"] - init["tokens"]).abs().max() > 1e-3
    assert (rank0["lora_B.0_q_proj"] - init["lora_B.0_q_proj"]).abs().max() > 1e-4

    single = train(model, config(data_dir, tmp_path / "single", batch), progress=False).state_dict()
    for k in rank0:
        torch.testing.assert_close(rank0[k], single[k], atol=1e-5, rtol=0, msg=f"distributed != single process on {k}")
    for key in ("loss", "grad_norm"):  # the norm of the averaged gradient, before clipping
        assert logged(ddp_root / name, key) == pytest.approx(logged(tmp_path / "single", key), abs=1e-5, rel=1e-5)
    # Adam and clipping hide a wrong gradient scale in the weights; the moments do not (exp_avg
    # is a running mean of the averaged gradients). Parameters that never reach the loss have no
    # state in the single process and zero moments in the distributed one.
    opt_ddp = load_file(str(ddp_root / name / "checkpoint" / "optimizer.safetensors"))
    opt_one = load_file(str(tmp_path / "single" / "checkpoint" / "optimizer.safetensors"))
    assert opt_one and set(opt_one) <= set(opt_ddp)
    for k in opt_one:
        torch.testing.assert_close(opt_ddp[k], opt_one[k], atol=1e-6, rtol=1e-4, msg=f"optimizer state {k}")
    for k in set(opt_ddp) - set(opt_one):
        assert k.endswith(".step") or opt_ddp[k].abs().max() == 0, k
    # rank 0 alone writes the run's files
    final = LookaheadModules.from_pretrained(ddp_root / name / "final").state_dict()
    torch.testing.assert_close(final["tokens"], rank0["tokens"], atol=0, rtol=0)
