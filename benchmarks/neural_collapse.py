"""Time and memory of the streamed neural-collapse metrics against a plain two-pass numpy version.

One command, one markdown table::

    python benchmarks/neural_collapse.py            # 10k samples, d=512, C=100, CPU
    python benchmarks/neural_collapse.py --device cuda

Rows:

- ``CollapseAccumulator``: what ``NCTracker`` runs: ``update`` per batch of features (float64
  state on the device, O(C d + d^2)), then one ``compute``.
- ``numpy two-pass``: the straightforward reference: keep every feature, pass 1 class means,
  pass 2 centred within-class scatter, ``pinv`` of the between-class covariance for NC1, pairwise
  distances for CDNV, nearest class mean (one class at a time) for NC4.

Memory is what each method must hold: the accumulator's state tensors, against the feature matrix
(float64) the two-pass method keeps plus its d x d matrices. The last column is the largest
relative difference between the two methods over the metrics both compute.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import numpy as np
import torch

from lightning_diag.metrics.collapse import CollapseAccumulator


def numpy_two_pass(h: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """NC1, NC3, NC4 and CDNV from their definitions (Papyan et al. 2020; Galanti et al. 2022)."""
    k = w.shape[0]
    means = np.stack([h[y == c].mean(0) for c in range(k)])  # pass 1
    centred = means - means.mean(0)
    within = h - means[y]  # pass 2
    sigma_w = within.T @ within / len(h)
    sigma_b = centred.T @ centred / k
    nc1 = float(np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-10, hermitian=True)) / k)
    nc3 = float(np.linalg.norm(w / np.linalg.norm(w) - centred / np.linalg.norm(centred)) ** 2)
    var = np.array([np.square(within[y == c]).sum(1).mean() for c in range(k)])
    dist2 = np.square(means[:, None, :] - means[None, :, :]).sum(-1)
    off = ~np.eye(k, dtype=bool)
    cdnv = float(((var[:, None] + var[None, :]) / (2 * np.where(off, dist2, 1.0)))[off].mean())
    ncc = np.stack([np.square(h - mu).sum(1) for mu in means], 1).argmin(1)  # N x C, not N x C x d
    nc4 = float(np.mean((h @ w.T + b).argmax(1) != ncc))
    return {"nc1": nc1, "nc3": nc3, "nc4": nc4, "cdnv": cdnv}


def streamed(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, batch: int) -> dict[str, float]:
    """The accumulator over batches, then the exact NC4 pass against the final means."""
    acc = CollapseAccumulator(w.shape[0], h.shape[1], device=h.device)
    for i in range(0, len(h), batch):
        acc.update(h[i : i + batch], y[i : i + batch])
    out = {k: float(v) for k, v in acc.compute(w, b).items()}
    acc.set_reference_means(acc.means, acc.counts > 0)
    acc.reset()
    for i in range(0, len(h), batch):
        hb = h[i : i + batch]
        acc.update(hb, y[i : i + batch], logits=hb.double() @ w.double().T + b.double())
    out["nc4"] = float(acc.compute(w, b)["nc4"])
    return out


def state_bytes(acc: CollapseAccumulator) -> int:
    return sum(v.numel() * v.element_size() for v in acc.state_dict().values() if isinstance(v, torch.Tensor))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    n, d, k = args.samples, args.dim, args.classes
    y = torch.arange(n) % k
    centres = 3 * torch.randn(k, d, generator=g)
    h = (centres[y] + torch.randn(n, d, generator=g)).float()
    w = centres + 0.1 * torch.randn(k, d, generator=g)
    b = 0.1 * torch.randn(k, generator=g)
    h_np, y_np, w_np, b_np = h.double().numpy(), y.numpy(), w.double().numpy(), b.double().numpy()
    dev = torch.device(args.device)
    hd, yd, wd, bd = h.to(dev), y.to(dev), w.to(dev), b.to(dev)

    def timed(fn):  # median seconds over repeats, and the last result
        times, out = [], None
        for _ in range(args.repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    t_acc, m_acc = timed(lambda: streamed(hd, yd, wd, bd, args.batch))
    t_np, m_np = timed(lambda: numpy_two_pass(h_np, y_np, w_np, b_np))
    acc = CollapseAccumulator(k, d, device=dev)
    acc.update(hd[: args.batch], yd[: args.batch])
    mem_acc = state_bytes(acc)
    mem_np = h_np.nbytes + 2 * d * d * 8 + h_np.nbytes  # features, sigma_w and sigma_b, centred copy
    diff = max(abs(m_acc[key] - m_np[key]) / max(abs(m_np[key]), 1e-12) for key in m_np)

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"N={n}, d={d}, C={k}, batch={args.batch}, device={dev}, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}\n")
    print("| method | median time (s) | memory held (MiB) | max rel. diff vs numpy |")
    print("|---|---:|---:|---:|")
    print(f"| CollapseAccumulator (streamed, NC4 exact by 2nd pass) | {t_acc:.3f} | {mem_acc / 2**20:.1f} "
          f"| {diff:.1e} |")
    print(f"| numpy two-pass (all features kept) | {t_np:.3f} | {mem_np / 2**20:.1f} | 0 |")
    print("\nmetrics (accumulator / numpy): " + ", ".join(f"{key} {m_acc[key]:.6g} / {m_np[key]:.6g}" for key in m_np))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
