"""Top Hessian eigenvalue: lightning_diag's warm-started estimator against PyHessian 0.1.

PyHessian (Yao et al. 2020) is the reference tool: ``hessian(model, criterion, data=(x, y),
cuda=False).eigenvalues(maxIter=100, tol=1e-3)`` runs power iteration from a random start (global
RNG) until two consecutive Rayleigh quotients agree within ``tol``, on double-backward
Hessian-vector products, after one forward and ``backward(create_graph=True)`` that it keeps. It
puts the model in eval mode and leaves graph-carrying tensors in ``.grad`` (this script undoes
both). It is an optional peer, not a dependency::

    pip install pyhessian==0.1
    python benchmarks/sharpness_peer.py              # CPU, about 2 minutes on one thread

Two models:

(a) a 212-parameter MLP (4 -> 30 -> 2, tanh, cross-entropy, a fixed batch of 512), where the dense
    Hessian (``torch.autograd.functional.hessian`` + ``eigvalsh``, float64) is the truth. Cold rows
    run from 5 random starts (worst error, median cost); the warm row follows 10 full-batch SGD
    steps with 4 products per check.
(b) the benchmark transformer of ``benchmarks/overhead.py`` (``GPT``; 4 layers, d=64, 0.24M
    parameters), AdamW as in that benchmark. The CPU SDPA kernel
    (``_scaled_dot_product_flash_attention_for_cpu``) has no double backward, like the CUDA flash
    and efficient kernels: PyHessian fails there, ours falls back to finite differences; with
    ``sdpa_kernel(SDPBackend.MATH)`` both run double backward. Truth: our power iteration run to
    ``tol=1e-5`` (at most 300 products, math kernel). Then ``--steps`` AdamW training steps, one
    check per step on that step's batch, after its backward (as in ``on_before_optimizer_step``),
    warm-started (4 products per operator): ``lambda_max`` and the AdamW stability ratio
    (preconditioned sharpness / 38), each against the same operator iterated to convergence from
    the check's vector ("settled"); and ``lambda_max`` by power iteration with the same budget.

Columns: the estimate, its relative error to the truth, Hessian-vector products (HVPs), forward+
backward passes of the loss where they differ, and wall-clock ms per check (median).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import GPT  # noqa: E402  (the benchmark transformer, not a package)

from lightning_diag.metrics.sharpness import (  # noqa: E402
    HessianVectorProduct,
    SharpnessEstimator,
    TrainingStateGuard,
    optimizer_stability,
    random_unit_vector,
    top_eigenvalue,
)

try:  # the module, not the class `pyhessian.hessian` that the package's __init__ re-exports
    pyhessian_module = importlib.import_module("pyhessian.hessian")
except ImportError:  # the peer is optional
    pyhessian_module = None


# -- the peer, instrumented -----------------------------------------------------------------------


def run_pyhessian(model: nn.Module, criterion: Callable, x: torch.Tensor, y: torch.Tensor,
                  seed: int) -> dict[str, Any]:
    """PyHessian's top eigenvalue with its defaults; HVPs counted by wrapping its product."""
    if pyhessian_module is None:
        return {"error": "not installed (pip install pyhessian==0.1)"}
    calls = [0]
    original = pyhessian_module.hessian_vector_product

    def counted(*args: Any) -> Any:
        calls[0] += 1
        return original(*args)

    pyhessian_module.hessian_vector_product = counted
    was_training = model.training
    torch.manual_seed(seed)  # PyHessian draws its start from the global RNG
    start = time.perf_counter()
    try:
        peer = pyhessian_module.hessian(model, criterion, data=(x, y), cuda=False)
        value = peer.eigenvalues(maxIter=100, tol=1e-3)[0][0]
        return {"estimate": value, "hvps": calls[0], "passes": 1, "ms": 1e3 * (time.perf_counter() - start)}
    except RuntimeError as err:
        return {"error": str(err).splitlines()[0]}
    finally:
        pyhessian_module.hessian_vector_product = original
        model.train(was_training)
        for p in model.parameters():
            p.grad = None  # PyHessian leaves graph-carrying gradients behind


def run_ours(estimator: SharpnessEstimator, loss_fn: Callable[[], torch.Tensor], model: nn.Module,
             optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    with TrainingStateGuard(model) as guard:
        result = estimator.estimate(guard.wrap(loss_fn), list(model.parameters()), optimizer)
    ms = 1e3 * (time.perf_counter() - start)
    figures = {k: float(v) for k, v in result.figures.items()}  # the one host read of a check
    return {"estimate": figures["lambda_max"], "figures": figures, "hvps": result.num_products,
            "passes": result.num_passes, "ms": ms, "method": result.method}


def settled(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], v0: torch.Tensor,
            d: torch.Tensor | None = None, tol: float = 1e-5, max_iters: int = 300) -> tuple[float, int]:
    """Lanczos (autograd, cycles of 20) from ``v0`` until the estimate moves less than ``tol``
    between cycles; on ``D H D`` if ``d`` is given."""
    hvp = HessianVectorProduct(loss_fn, params, method="autograd")
    matvec = hvp if d is None else (lambda v: d * hvp(d * v))
    est = top_eigenvalue(matvec, v0, iters=max_iters, basis=20, tol=tol)
    return float(est.eigenvalue), est.num_products


# -- (a) the MLP ----------------------------------------------------------------------------------


def mlp_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 30), nn.Tanh(), nn.Linear(30, 2))  # 150 + 62 = 212 parameters
    x = torch.randn(512, 4, generator=gen)
    y = (x[:, 0] * x[:, 1] + 0.3 * torch.randn(512, generator=gen) > 0).long()
    return model, x, y


def dense_top(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    ref = copy.deepcopy(model).double()
    names, shapes = zip(*[(n, p.shape) for n, p in ref.named_parameters()])
    flat = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, (t.view(s) for t, s in zip(theta.split([s.numel() for s in shapes]), shapes))))
        return F.cross_entropy(torch.func.functional_call(ref, parts, (x.double(),)), y)

    return float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))[-1])


def bench_mlp(repeats: int) -> list[tuple]:
    model, x, y = mlp_problem()
    loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    truth = dense_top(model, x, y)
    rows = []
    cold: dict[str, Callable[[int], dict[str, Any]]] = {
        "PyHessian 0.1 (tol 1e-3, <= 100 iters)": lambda s: run_pyhessian(model, nn.CrossEntropyLoss(), x, y, s),
        "ours cold, 20 products (Lanczos), no host sync": lambda s: run_ours(
            SharpnessEstimator(cold_iters=20, seed=s), loss_fn, model),
        "ours cold, 20 products, power iteration": lambda s: run_ours(
            SharpnessEstimator(cold_iters=20, algorithm="power", seed=s), loss_fn, model),
        "ours cold, tol 1e-3 (<= 100, host read per cycle of 5)": lambda s: run_ours(
            SharpnessEstimator(cold_iters=100, tol=1e-3, seed=s), loss_fn, model),
        "ours cold, 20 products, finite differences (forward)": lambda s: run_ours(
            SharpnessEstimator(cold_iters=20, method="finite_difference", seed=s), loss_fn, model),
    }
    for name, fn in cold.items():
        runs = [fn(seed) for seed in range(repeats)]
        if "error" in runs[0]:
            rows.append((name, runs[0]["error"], "", "", "", ""))
            continue
        worst = max(runs, key=lambda r: abs(r["estimate"] - truth))
        rows.append((name, f"{worst['estimate']:.4f}", f"{100 * abs(worst['estimate'] - truth) / truth:.2f}%",
                     _span([r["hvps"] for r in runs]), _span([r["passes"] for r in runs]),
                     f"{statistics.median(r['ms'] for r in runs):.1f}"))

    # Warm: 10 full-batch SGD steps, one 4-product check after each, truth re-computed densely.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    est = SharpnessEstimator(iters=4, cold_iters=20)
    run_ours(est, loss_fn, model)  # the cold start
    errors, ms = [], []
    for _ in range(10):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        r = run_ours(est, loss_fn, model)
        top = dense_top(model, x, y)
        errors.append(abs(r["estimate"] - top) / top)
        ms.append(r["ms"])
    rows.append(("ours warm, 4 products per check (10 SGD steps)", f"{r['estimate']:.4f} (last)",
                 f"{100 * max(errors):.2f}% (worst)", "4", "1", f"{statistics.median(ms):.1f}"))
    rows.insert(0, ("dense Hessian + eigvalsh (float64)", f"{truth:.4f}", "0", "-", "-",
                    f"{_time(lambda: dense_top(model, x, y)):.1f}"))
    return rows


# -- (b) the transformer --------------------------------------------------------------------------


def bench_gpt(args: argparse.Namespace) -> tuple[list[tuple], list[tuple]]:
    torch.manual_seed(0)
    model = GPT.from_args(args, args.steps + 1)
    batches = [model.data[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.steps + 1)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    # One AdamW step first, so the optimizer has a second moment to precondition with.
    x, y = batches[0]
    criterion = lambda out, target: F.cross_entropy(out.flatten(0, 1), target.flatten())  # noqa: E731
    opt.zero_grad()
    criterion(model(x), y).backward()
    opt.step()
    params = list(model.parameters())
    x, y = batches[1]

    def loss_fn() -> torch.Tensor:
        return criterion(model(x), y)

    math_kernel = lambda: sdpa_kernel(SDPBackend.MATH)  # noqa: E731
    with math_kernel():
        truth, truth_products = settled(loss_fn, params, random_unit_vector(sum(p.numel() for p in params), seed=99))
    rows = [("ours, tol 1e-5 (truth), math SDPA", f"{truth:.4f}", "0", str(truth_products), "", "")]
    for name, kernel, fn in (
        ("PyHessian 0.1, default SDPA", contextlib.nullcontext, lambda: run_pyhessian(model, criterion, x, y, 0)),
        ("PyHessian 0.1, math SDPA", math_kernel, lambda: run_pyhessian(model, criterion, x, y, 0)),
        ("ours cold 20, default SDPA (auto)", contextlib.nullcontext,
         lambda: run_ours(SharpnessEstimator(cold_iters=20), loss_fn, model)),
        ("ours cold 20, math SDPA (autograd)", math_kernel,
         lambda: run_ours(SharpnessEstimator(cold_iters=20, method="autograd"), loss_fn, model)),
        ("ours cold 20, math SDPA, power iteration", math_kernel,
         lambda: run_ours(SharpnessEstimator(cold_iters=20, method="autograd", algorithm="power"), loss_fn, model)),
        ("ours cold, tol 1e-3, math SDPA (autograd)", math_kernel,
         lambda: run_ours(SharpnessEstimator(cold_iters=100, tol=1e-3, method="autograd"), loss_fn, model)),
    ):
        with kernel():
            r = fn()
        if "error" in r:
            rows.append((name, f"fails: {r['error'][:90]}", "", "", "", ""))
            continue
        method = f" [{r['method']}]" if "method" in r else ""
        rows.append((name + method, f"{r['estimate']:.4f}", f"{100 * abs(r['estimate'] - truth) / truth:.2f}%",
                     str(r["hvps"]), str(r["passes"]), f"{r['ms']:.0f}"))

    # Warm, over training steps, as the callback would run in on_before_optimizer_step: backward,
    # check on that batch (gradients in .grad: AdamW's coming preconditioner), step. Default SDPA
    # (the kernel training uses), so the estimator runs finite differences; settled values with
    # the math kernel and autograd, from the check's own vectors.
    est = SharpnessEstimator(iters=4, cold_iters=20)
    power = SharpnessEstimator(iters=4, cold_iters=20, algorithm="power")  # lambda_max only, for contrast
    warm_rows = []
    for step in range(1, args.steps + 1):
        x, y = batches[step]
        opt.zero_grad()
        loss_fn().backward()
        r = run_ours(est, loss_fn, model, opt)
        f = r["figures"]
        lam_power = run_ours(power, loss_fn, model)["estimate"]
        (group,) = optimizer_stability(opt)
        d = torch.cat([torch.as_tensor(x_).sqrt().expand(p.shape).reshape(-1)
                       for x_, p in zip(group.inverse_preconditioner, params)])
        with math_kernel():
            lam, _ = settled(loss_fn, params, est.warm_vector())
            pre, _ = settled(loss_fn, params, est.warm_vector("preconditioned"), d=d)
        warm_rows.append((step, "cold" if step == 1 else "warm", r["method"],
                          f"{f['lambda_max']:.4f}", f"{lam:.4f}", f"{100 * abs(f['lambda_max'] - lam) / lam:.1f}%",
                          f"{lam_power:.4f} ({100 * abs(lam_power - lam) / lam:.0f}%)",
                          f"{f['stability_ratio']:.3f}", f"{pre / 38:.3f}",
                          f"{100 * abs(f['preconditioned_lambda_max'] - pre) / pre:.1f}%",
                          str(r["hvps"]), str(r["passes"]), f"{r['ms']:.0f}"))
        opt.step()
    return rows, warm_rows


# -- output ---------------------------------------------------------------------------------------


def _span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _time(fn: Callable[[], Any], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _table(header: tuple, rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--repeats", type=int, default=5, help="random starts of the cold MLP rows")
    parser.add_argument("--steps", type=int, default=4, help="AdamW steps of the warm transformer table")
    GPT.add_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    header = ("method", "lambda_max", "error", "HVPs", "loss passes", "ms per check")
    mlp = bench_mlp(args.repeats)
    gpt, warm = bench_gpt(args)
    n_params = sum(p.numel() for p in GPT.from_args(args, 1).parameters())
    peer = "PyHessian 0.1" if pyhessian_module is not None else "PyHessian not installed"
    print(f"\n{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, {peer}\n")
    print(f"(a) MLP 4-30-2, 212 parameters, fixed batch of 512; cold rows: worst of {args.repeats} random starts\n")
    print(_table(header, mlp))
    print(f"\n(b) GPT {args.n_layer}x{args.n_embd}, {n_params / 1e6:.2f}M parameters, batch {args.batch_size}x"
          f"{args.seq_len}, after one AdamW step; one check\n")
    print(_table(header, gpt))
    print(f"\n(b') the same GPT over {args.steps} AdamW steps (lr 3e-4), one check per step on the step's batch "
          "after its backward, default SDPA, 4 products per operator when warm; settled = the same operator "
          "iterated from the check's vector to tol 1e-5 (math SDPA, autograd)\n")
    print(_table(("step", "start", "method", "lambda_max", "settled", "error", "power iteration (error)",
                  "stability_ratio (AdamW, /38)",
                  "settled", "error", "HVPs", "loss passes", "ms per check"), warm))
    print("\ncommand: python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]))


if __name__ == "__main__":
    main()
