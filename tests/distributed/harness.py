"""Run a tiny LightningModule under one process, DDP, FSDP2 or HSDP and return what was logged.

So a test can assert that a monitor gives the single-process figures under every strategy::

    from harness import run_fit
    single = run_fit("single", "tests/distributed/probes.py:norm_probe", tmp_path)
    fsdp2 = run_fit("fsdp2", "tests/distributed/probes.py:norm_probe", tmp_path)
    assert_same_figures(fsdp2, single)

Strategies (all on CPU, gloo):

- ``"single"``: one process, in the test's own process.
- ``"ddp"``: ``strategy="ddp"``, 2 processes.
- ``"fsdp2"``: ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``, 2
  processes; ``configure_model`` applies ``fully_shard`` to every ``nn.Linear`` and to the root
  on the ``data_parallel`` mesh: parameters and gradients are ``DTensor`` with ``Shard(0)``,
  split unevenly (7 rows: 4 + 3; 1 row: 1 + 0).
- ``"fsdp1"`` (CUDA only, as Lightning's ``FSDPStrategy`` demands): ``FSDPStrategy`` wrapping
  every ``nn.Linear`` (flat parameters, ``use_orig_params=True``), on ``min(2, GPUs)``
  processes with NCCL. On one GPU the world size is 1 and FSDP1 falls back to ``NO_SHARD``: it
  then checks only names, parameter resolution and the CUDA path.
- ``"hsdp"``: the same with ``fully_shard`` on the whole 2-D mesh ``(data_parallel=2,
  tensor_parallel=1)``, i.e. HSDP: placements ``(Replicate(), Shard(0))``, each rank holding a
  full replica. A figure that counts replicas twice is ``sqrt(2)`` too high here.

Every strategy sees the same global batch at every step: one process takes ``global_batch``
rows; under 2 processes each rank takes ``global_batch / 2`` of them through a
``DistributedSampler(shuffle=False)`` (rank ``r`` gets rows ``r, r + 2, ...`` of each global
batch). The loss is a mean over the rank's rows and DDP/FSDP average the gradients, so the
gradients equal the single-process ones up to rounding. (Lightning's own sampler for training
*shuffles*, with a seed, which is why the module brings its own.)

**Launching.** Lightning's ``ModelParallelStrategy`` and ``"ddp"`` start the other ranks by
re-running ``sys.argv`` (``_SubprocessScriptLauncher``), which from pytest would re-run pytest;
``ddp_spawn`` exists for DDP only. So the harness starts every rank itself: this file is the
worker script, run as ``python harness.py --strategy ... --callbacks FILE:FACTORY --out PATH``
with ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set, which Lightning
reads as "processes created externally" (as under ``torchrun``).

**Callbacks** are named by ``"path/to/file.py:factory"``, ``factory(**callback_kwargs)``
returning a list of callbacks; each rank imports the file by path. Each rank writes what its
loggers received to ``<out>.rank<r>.json``; :func:`run_fit` returns rank zero's (or every
rank's with ``all_ranks=True``) as ``{key: [(step, value), ...]}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
STRATEGIES = ("single", "ddp", "fsdp2", "hsdp", "fsdp1")
History = dict[str, list[tuple[int, float]]]


# -- the worker side (imports torch and Lightning lazily, so that the launcher stays light) ------


def _fsdp1_world() -> int:
    import torch

    return max(1, min(2, torch.cuda.device_count()))


def _build(strategy: str, callbacks: list[Any], steps: int, global_batch: int, seed: int, trainer_kwargs: dict) -> Any:
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    class ShardedMLP(pl.LightningModule):
        """Linear layers of uneven widths (4 -> 7 -> 7 -> 7 -> 5 -> 1), tanh between, MSE loss, SGD."""

        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            widths = (4, 7, 7, 7, 5, 1)
            layers: list[nn.Module] = []
            for d_in, d_out in zip(widths, widths[1:]):
                linear = nn.Linear(d_in, d_out)
                with torch.no_grad():  # a private generator: the same weights in every process
                    linear.weight.copy_(torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in))
                    linear.bias.copy_(0.1 * torch.randn(d_out, generator=g))
                layers += [linear, nn.Tanh()]
            self.net = nn.Sequential(*layers[:-1])
            x = torch.randn(steps * global_batch, 4, generator=g)
            self.data = TensorDataset(x, x.sum(1, keepdim=True).sin())

        def configure_model(self) -> None:
            if strategy not in ("fsdp2", "hsdp"):
                return
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh if strategy == "hsdp" else self.device_mesh["data_parallel"]
            for module in self.net:
                if isinstance(module, nn.Linear):
                    fully_shard(module, mesh=mesh)
            fully_shard(self, mesh=mesh)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            # Through the root's forward, as FSDP2 requires of a model whose root is sharded: a probe
            # pass (NCTracker) that calls the module fails once submodules ran as roots of their own.
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.2)

        def train_dataloader(self) -> DataLoader:
            world, rank = self.trainer.world_size, self.trainer.global_rank
            sampler = DistributedSampler(self.data, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
            return DataLoader(self.data, batch_size=global_batch // world, sampler=sampler, shuffle=False)

    class RecordingLogger(pl.loggers.Logger):
        """Keeps every ``log_metrics`` call, on every rank (the worker writes them to a file)."""

        def __init__(self) -> None:
            super().__init__()
            self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

        name, version = "recording", 0

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            for key, value in metrics.items():
                self.history[key].append((step, float(value)))

    if strategy == "single":
        dist_kwargs: dict[str, Any] = dict(devices=1)
    elif strategy == "fsdp1":
        from lightning.pytorch.strategies import FSDPStrategy

        dist_kwargs = dict(accelerator="cuda", devices=_fsdp1_world(),
                           strategy=FSDPStrategy(auto_wrap_policy={nn.Linear}))
    elif strategy == "ddp":
        dist_kwargs = dict(devices=2, strategy="ddp")
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        dist_kwargs = dict(devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    logger = RecordingLogger()
    kwargs: dict[str, Any] = dict(accelerator="cpu")
    kwargs.update(
        max_steps=steps, logger=logger, callbacks=callbacks, log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **dist_kwargs,
    )
    kwargs.update(trainer_kwargs)  # e.g. accelerator="cuda" for the single-process reference on a GPU
    return pl.Trainer(**kwargs), ShardedMLP(), logger


def load_factory(spec: str) -> Any:
    """``"path/to/file.py:name"`` -> the object ``name`` of that file (imported by path)."""
    path, _, name = spec.rpartition(":")
    file = Path(path) if Path(path).is_absolute() else REPO / path
    module_name = f"_harness_callbacks_{file.stem}"
    if module_name in sys.modules:
        return getattr(sys.modules[module_name], name)
    loaded = importlib.util.spec_from_file_location(module_name, file)
    if loaded is None or loaded.loader is None:
        raise ValueError(f"cannot import callbacks from {file}")
    module = importlib.util.module_from_spec(loaded)
    sys.modules[module_name] = module
    loaded.loader.exec_module(module)
    return getattr(module, name)


def fit_and_record(
    strategy: str, callbacks: str, out: Path, *, steps: int = 4, global_batch: int = 8, seed: int = 0,
    callback_kwargs: dict | None = None, trainer_kwargs: dict | None = None,
) -> None:
    """Fit under ``strategy`` in this process (a rank) and write its loggers' history to ``<out>.rank<r>.json``."""
    import torch

    torch.set_num_threads(1)
    cbs = load_factory(callbacks)(**(callback_kwargs or {}))
    trainer, model, logger = _build(strategy, cbs, steps, global_batch, seed, trainer_kwargs or {})
    trainer.fit(model)
    record = {"strategy": strategy, "rank": trainer.global_rank, "world_size": trainer.world_size,
              "history": {k: list(v) for k, v in logger.history.items()}}
    Path(f"{out}.rank{trainer.global_rank}.json").write_text(json.dumps(record))
    import torch.distributed as dist

    if dist.is_initialized():  # leave together: a gloo group torn down at interpreter exit can abort a rank
        dist.barrier()
        dist.destroy_process_group()


# -- the test side ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fit(
    strategy: str, callbacks: str, tmp_path: Path, *, steps: int = 4, global_batch: int = 8, seed: int = 0,
    callback_kwargs: dict | None = None, trainer_kwargs: dict | None = None, timeout: float = 120.0,
    all_ranks: bool = False,
) -> History | list[History]:
    """Fit the harness module under ``strategy`` with the given callbacks; return what was logged.

    Args:
        strategy: one of ``STRATEGIES``.
        callbacks: ``"path/to/file.py:factory"`` (relative to the repository root, or absolute).
        tmp_path: where the ranks write their records.
        steps: optimizer steps.
        global_batch: rows per step over all ranks (even).
        callback_kwargs: passed to the factory (JSON-serialisable).
        trainer_kwargs: extra ``Trainer`` arguments (JSON-serialisable).
        timeout: seconds before every rank is killed and the test fails.
        all_ranks: return every rank's history (a list, by rank) instead of rank zero's.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}")
    out = Path(tmp_path) / f"{strategy}-{time.monotonic_ns()}"
    options = dict(steps=steps, global_batch=global_batch, seed=seed, callback_kwargs=callback_kwargs,
                   trainer_kwargs=trainer_kwargs)
    world = 1 if strategy == "single" else _fsdp1_world() if strategy == "fsdp1" else 2
    if world == 1:
        fit_and_record(strategy, callbacks, out, **options)  # type: ignore[arg-type]
    else:
        _launch(strategy, callbacks, out, world, options, timeout)
    histories = []
    for rank in range(world):
        record = json.loads(Path(f"{out}.rank{rank}.json").read_text())
        histories.append({k: [(int(s), float(v)) for s, v in pairs] for k, pairs in record["history"].items()})
    return histories if all_ranks else histories[0]


def _launch(strategy: str, callbacks: str, out: Path, world: int, options: dict, timeout: float) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world), NODE_RANK="0",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--strategy", strategy, "--callbacks", callbacks,
           "--out", str(out), "--options", json.dumps(options)]
    procs = []
    for rank in range(world):
        log = open(f"{out}.rank{rank}.log", "w")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(cmd, env={**env, "LOCAL_RANK": str(rank)}, cwd=REPO, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True), log))
    deadline = time.monotonic() + timeout
    failed = None
    for rank, (proc, log) in enumerate(procs):
        try:
            code = proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            code = None
        if code != 0 and failed is None:
            failed = (rank, "timed out" if code is None else f"exit code {code}")
            for other, _ in procs:  # a rank that failed leaves the others waiting in a collective
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
        log.close()
    if failed is not None:
        rank, why = failed
        tail = Path(f"{out}.rank{rank}.log").read_text()[-4000:]
        raise RuntimeError(f"{strategy} rank {rank} {why}; its output ends with:\n{tail}")


def assert_same_figures(got: History, expected: History, *, rel: float = 1e-5, abs_: float = 1e-6) -> None:
    """Same keys, same steps, and every value equal within ``rel``/``abs_`` (NaN equals NaN)."""
    assert sorted(got) == sorted(expected), f"keys differ: {sorted(set(got) ^ set(expected))}"
    for key in expected:
        steps_got, steps_exp = [s for s, _ in got[key]], [s for s, _ in expected[key]]
        assert steps_got == steps_exp, f"{key}: logged at steps {steps_got}, expected {steps_exp}"
        for (step, a), (_, b) in zip(got[key], expected[key]):
            same = (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=abs_)
            assert same, f"{key} at step {step}: {a!r} != {b!r} (rel {rel}, abs {abs_})"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=STRATEGIES, required=True)
    parser.add_argument("--callbacks", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--options", default="{}")
    args = parser.parse_args()
    fit_and_record(args.strategy, args.callbacks, Path(args.out), **json.loads(args.options))
    # The record is written and the group destroyed. Skip the interpreter's teardown: about one rank
    # in twenty of a 2-process gloo run aborts there ("terminate called without an active exception",
    # a native thread destroyed while joinable), after its work is done. A rank that fails
    # before this line still exits non-zero and fails its test.
    sys.stdout.flush()
    os._exit(0)
