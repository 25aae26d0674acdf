"""Step-time overhead of the lightning_diag monitors on a small GPT-style transformer.

One command, one markdown table::

    python benchmarks/overhead.py                 # CPU, about 3 minutes
    python benchmarks/overhead.py --device cuda   # when a GPU is present
    python benchmarks/overhead.py --device cuda --n-layer 12 --n-embd 768 --seq-len 256  # GPT-2 small-ish

Rows (``CONFIGS``, a dict of name -> factory of callbacks; a new monitor is one more entry, e.g.
``"LossSpikeDetector": lambda: [LossSpikeDetector()]``; its work hooks (``HOOKS``) are timed):

- ``no callback``: the baseline.
- ``GradNormWatcher``: default cadence (the trainer's ``log_every_n_steps=50``).
- ``Lightning grad_norm``: the recipe from Lightning's docs, ``self.log_dict(grad_norm(module,
  norm_type=2))`` in ``on_before_optimizer_step``, every step. ``grad_norm`` launches one norm per
  parameter and builds the total from a Python list of 0-d tensors (one host read per parameter).
- ``zclip ZClipLightningCallback``: the zclip package's own callback (``pip install zclip==1.0.0``;
  the row is left out without it), against ``GradNormWatcher(clip="zclip")``.
- ``all three monitors``: GradNormWatcher + LossSpikeDetector + SpectralAlignmentMonitor at defaults.

Columns: median and mean step time over the timed steps (warm-up excluded; repetitions
interleaved row by row, the order rotating, so that drifts in machine load hit every row alike);
the median's ratio to ``no callback`` is paired (median over repetitions of row / baseline in the
same repetition). The mean includes the monitors' logging and check steps: with the default 250
timed steps it covers a whole cycle of every default cadence, so ``x no-callback (mean)`` is the
amortized overhead (the one to read for check-step monitors such as SharpnessMonitor, whose median
step is untouched). ``hook ms/step`` is the host time spent inside the row's callback hooks,
averaged over all timed steps: the steadiest measure of a callback's own cost on a busy machine (it
leaves out what Lightning does afterwards with values handed to ``self.log``, and forward hooks, so
it flatters the ``grad_norm`` recipe and the spectral and logit monitors), also as a percentage of
the baseline's median step. ``ATen ops/step``: top-level ATen ops dispatched per optimizer step,
amortized over a whole ``fit`` of ``--count-steps`` steps at Lightning's default logging cadence (a
``TorchDispatchMode`` around ``trainer.fit``, minus the same fit without callbacks): every hook,
forward hooks and logging steps included. On CUDA a last column counts the hooks' host syncs per
step (``torch.cuda.set_sync_debug_mode("warn")``) on a quiet and a logging step.

On the CPU the default is one thread (``--threads``): a shared machine makes multi-threaded
medians wander far more than the overheads being measured.
"""

from __future__ import annotations

import argparse
import logging
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, SpikeDetection
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag import (
    GradNormWatcher,
    LogitMonitor,
    LossSpikeDetector,
    SharpnessMonitor,
    SpectralAlignmentMonitor,
    StabilityGovernor,
)

try:  # the peer of GradNormWatcher(clip="zclip"); optional
    from zclip.zclip_lightning_callback import ZClipLightningCallback
except ImportError:
    ZClipLightningCallback = None

LOG_EVERY_N_STEPS = 50  # Lightning's default cadence, used by every row


# -- the model ------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-LN transformer block: causal self-attention and a 4x MLP."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv, self.proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.fc, self.fc_out = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, self.n_head, c // self.n_head).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc_out(F.gelu(self.fc(self.ln_2(x))))


class GPT(pl.LightningModule):
    """A small GPT on random tokens (the benchmark measures time, not learning)."""

    def __init__(self, vocab: int, n_layer: int, n_embd: int, n_head: int, seq_len: int, batch_size: int,
                 steps: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, n_embd), nn.Embedding(seq_len, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f, self.head = nn.LayerNorm(n_embd), nn.Linear(n_embd, vocab, bias=False)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, vocab, (steps * batch_size, seq_len + 1), generator=g)
        self.data, self.batch_size = TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The model's size options (``--n-layer`` ... ``--vocab``), shared by the benchmarks that use it."""
        for flag, default in (("--n-layer", 4), ("--n-embd", 64), ("--n-head", 4), ("--seq-len", 64),
                              ("--batch-size", 8), ("--vocab", 256)):  # fmt: skip
            parser.add_argument(flag, type=int, default=default)

    @classmethod
    def from_args(cls, args: argparse.Namespace, steps: int) -> GPT:
        """The model sized by :meth:`add_arguments`' options, with data for ``steps`` batches."""
        return cls(args.vocab, args.n_layer, args.n_embd, args.n_head, args.seq_len, args.batch_size, steps)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-4)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)


# -- the rows -------------------------------------------------------------------------------------


class LightningGradNorm(Callback):
    """The usual recipe (Lightning docs, "Track and Visualize Experiments"): every step,
    ``self.log_dict(grad_norm(self, norm_type=2))`` in ``on_before_optimizer_step``."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        pl_module.log_dict(grad_norm(pl_module, norm_type=2))


CONFIGS: dict[str, Callable[[], list[Callback]]] = {
    "no callback": lambda: [],
    f"GradNormWatcher (every {LOG_EVERY_N_STEPS} steps)": lambda: [GradNormWatcher(action="log")],
    "Lightning grad_norm (every step)": lambda: [LightningGradNorm()],
    # The loss detector's comparator is Lightning's SpikeDetection (defaults: running mean of 10
    # losses, one host read per step, plus a barrier and an all-reduce under DDP).
    f"LossSpikeDetector (log, every {LOG_EVERY_N_STEPS} steps)": lambda: [LossSpikeDetector(action="log")],
    "LossSpikeDetector (skip: 1 flag read/step)": lambda: [LossSpikeDetector(action="skip")],
    # One extra forward per check (f1) and two fused dot products; checks every 25 steps while the
    # overshoot ratio is low. Its work runs inside optimizer.step (the StepControl) and in
    # on_train_batch_end: the step time shows all of it, the hook time the part in hooks.
    "StabilityGovernor (check every 25 steps)": lambda: [StabilityGovernor(action="log")],
    "Lightning SpikeDetection (every step)": lambda: [SpikeDetection()],
    # Sampling happens in forward pre-hooks on check steps: it shows in step time, not hook time.
    "SpectralAlignmentMonitor (check every 10 steps)": lambda: [SpectralAlignmentMonitor(action="log")],
    # Both work on check steps only (defaults: every 250 and every 20 steps); the mean step and the
    # hook time amortize the checks that fall inside the timed steps. The sharpness check runs in
    # on_before_optimizer_step (hook time); LogitMonitor's recorder runs inside the forward (step time).
    "SharpnessMonitor (check every 250 steps)": lambda: [SharpnessMonitor(action="log")],
    "LogitMonitor (check every 20 steps)": lambda: [LogitMonitor(action="log")],
    "all three monitors": lambda: [GradNormWatcher(action="log"), LossSpikeDetector(action="log"),
                                   SpectralAlignmentMonitor(action="log")],
    'GradNormWatcher(clip="zclip")': lambda: [GradNormWatcher(clip="zclip", action="log")],
    **({'zclip ZClipLightningCallback(mode="zscore")': lambda: [ZClipLightningCallback(mode="zscore")]}
       if ZClipLightningCallback is not None else {}),
}
BASELINE = "no callback"
# Where monitors do their work. LossSpikeDetector reads the loss in on_before_backward; with
# action="skip" its gated optimizer.step (one flag read) is in no hook and shows in step time only.
HOOKS = (
    "on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end",
)


# -- measuring ------------------------------------------------------------------------------------


class NullLogger(Logger):
    """A logger that drops everything: every row pays for handing metrics over, none for I/O."""

    name, version = "null", 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass


class StepTimer(Callback):
    """Wall time from ``on_train_batch_start`` to ``on_train_batch_end`` of every step."""

    def __init__(self, device: str) -> None:
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.times: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.sync()
        self.times.append(time.perf_counter() - self._start)


class OpCounter(TorchDispatchMode):
    """Top-level ATen ops dispatched while active (ops nested inside another op are not seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def wrap_hooks(callbacks: list[Callback], around: Callable[[int, Callable[[], None]], None]) -> None:
    """Route every overridden work hook (``HOOKS``) of the callbacks through ``around(step, call)``,
    ``step`` being the optimizer step the call belongs to (0-based, as Lightning counts)."""
    for callback in callbacks:
        for name in HOOKS:
            if getattr(type(callback), name) is getattr(Callback, name):
                continue  # not overridden: no work there
            hook, after_step = getattr(callback, name), name == "on_train_batch_end"

            def wrapped(trainer: pl.Trainer, *args: Any, _hook: Any = hook, _after: bool = after_step) -> None:
                # on_train_batch_end runs after the step counter moved on
                around(trainer.global_step - _after, lambda: _hook(trainer, *args))

            setattr(callback, name, wrapped)  # Lightning looks hooks up on the instance


def hook_timer(times: dict[int, float]) -> Callable[[int, Callable[[], None]], None]:
    """Adds each hook call's host wall time to ``times[step]`` (on CUDA: launch time plus any syncs
    the hook forces; its kernels' GPU time shows in the step time)."""

    def around(step: int, call: Callable[[], None]) -> None:
        start = time.perf_counter()
        call()
        times[step] = times.get(step, 0.0) + time.perf_counter() - start

    return around


def op_counter(counts: dict[int, dict[str, int]], cuda: bool) -> Callable[[int, Callable[[], None]], None]:
    """Counts ATen ops (and, on CUDA, host syncs as ``"syncs"``) of hook calls at the steps in ``counts``."""

    def around(step: int, call: Callable[[], None]) -> None:
        if step not in counts:
            return call()
        with OpCounter() as counter, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                call()
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
        for op, n in counter.ops.items():
            counts[step][op] += n
        counts[step]["syncs"] += sum("synchroniz" in str(w.message) for w in caught)

    return around


def fit(args: argparse.Namespace, callbacks: list[Callback], max_steps: int, log_every_n_steps: int) -> None:
    torch.manual_seed(0)
    model = GPT.from_args(args, max_steps)
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_steps=max_steps,
        logger=NullLogger(), log_every_n_steps=log_every_n_steps, callbacks=callbacks, precision=args.precision,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(model)


def fit_ops(args: argparse.Namespace, callbacks: list[Callback]) -> int:
    """Top-level ATen ops of a whole fit of ``--count-steps`` steps at the default logging cadence."""
    with OpCounter() as counter:
        fit(args, callbacks, args.count_steps, LOG_EVERY_N_STEPS)
    return sum(counter.ops.values())


def measure(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Time every row ``args.repeats`` times, interleaved (rotating the order each repetition),
    then count each row's hook ops in a short run."""
    results: dict[str, dict[str, Any]] = {name: {"times": [], "rep_medians": [], "hook": []} for name in CONFIGS}
    names = list(CONFIGS)
    for rep in range(args.repeats):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            callbacks, timer, hook_times = CONFIGS[name](), StepTimer(args.device), {}
            wrap_hooks(callbacks, hook_timer(hook_times))
            fit(args, [*callbacks, timer], args.warmup + args.steps, LOG_EVERY_N_STEPS)
            timed = timer.times[args.warmup:]
            results[name]["times"] += timed
            results[name]["rep_medians"].append(statistics.median(timed))
            results[name]["hook"] += [hook_times.get(s, 0.0) for s in range(args.warmup, args.warmup + args.steps)]
            print(f"  rep {rep + 1}/{args.repeats} {name}: median {1e3 * statistics.median(timed):.2f} ms",
                  file=sys.stderr, flush=True)
    baseline_ops = fit_ops(args, [])
    for name, factory in CONFIGS.items():
        results[name]["ops"] = (fit_ops(args, factory()) - baseline_ops) / args.count_steps
        if args.device == "cuda":  # cadence 2 here: step 2 does not log, step 3 does
            callbacks, counts = factory(), {2: defaultdict(int), 3: defaultdict(int)}
            wrap_hooks(callbacks, op_counter(counts, cuda=True))
            fit(args, callbacks, 4, log_every_n_steps=2)
            results[name]["syncs"] = {s: c.pop("syncs", 0) for s, c in counts.items()}
    return results


def _pair(counts: dict[int, int]) -> str:
    return str(counts[2]) if counts[2] == counts[3] else f"{counts[2]}/{counts[3]}"


def table(results: dict[str, dict[str, Any]], cuda: bool) -> str:
    base = results[BASELINE]
    base_median = statistics.median(base["times"])
    rows = [
        "| config | median step ms | x no-callback | mean step ms | x no-callback (mean) | hook ms/step "
        "| hook % of step | ATen ops/step (fit, amortized) |"
        + (" hook host syncs/step (quiet/logging) |" if cuda else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else ""),
    ]
    for name, r in results.items():
        median, mean = statistics.median(r["times"]), statistics.fmean(r["times"])
        # paired: each repetition against the baseline's run of the same repetition
        ratio = statistics.median(m / b for m, b in zip(r["rep_medians"], base["rep_medians"]))
        ratio_mean = mean / statistics.fmean(base["times"])
        hook = statistics.fmean(r["hook"])
        rows.append(
            f"| {name} | {1e3 * median:.2f} | {ratio:.3f} | {1e3 * mean:.2f} | {ratio_mean:.3f} | {1e3 * hook:.3f} "
            f"| {100 * hook / base_median:.2f}% | {r['ops']:.1f} |" + (f" {_pair(r['syncs'])} |" if cuda else "")
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=250,
                        help="timed steps per repetition and row (250: a whole cycle of every default cadence)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of every row")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    GPT.add_arguments(parser)
    parser.add_argument("--precision", default="32-true", help="Trainer precision, e.g. bf16-mixed on a GPU")
    parser.add_argument("--count-steps", type=int, default=100, help="steps of the fit whose ops are counted")
    parser.add_argument("--only", nargs="*", default=None, help="rows to run (substrings of their names)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # no-op on CPUs without the switch; avoids slow denormal math
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # no per-fit banners

    if args.only:
        for name in [n for n in CONFIGS if n != BASELINE and not any(o in n for o in args.only)]:
            del CONFIGS[name]
    results = measure(args)
    model = GPT.from_args(args, 1)
    n_params, n_tensors = sum(p.numel() for p in model.parameters()), len(list(model.parameters()))
    if args.device == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"{platform.machine()}, {torch.get_num_threads()} threads"
    timed = range(args.warmup, args.warmup + args.steps)
    logging_steps = sum((s + 1) % LOG_EVERY_N_STEPS == 0 for s in timed)
    print(f"\nGPT: {args.n_layer} layers, d={args.n_embd}, {n_params / 1e6:.2f}M parameters in {n_tensors} tensors, "
          f"batch {args.batch_size}x{args.seq_len}, {args.precision}; {args.device} ({device}); "
          f"torch {torch.__version__}, "
          f"lightning {pl.__version__}; {args.repeats} x {args.steps} timed steps per row, of which "
          f"{logging_steps} per repetition are logging steps at cadence {LOG_EVERY_N_STEPS}\n")
    print(table(results, cuda=args.device == "cuda"))
    print(f"\nCommand: python {shlex.join(['benchmarks/overhead.py', *(sys.argv[1:] if argv is None else argv)])}")


if __name__ == "__main__":
    main()
