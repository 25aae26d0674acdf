""":class:`CharLM`: character-level language modelling on Python's standard-library source.

One LightningModule for every language-model testbed: the network is chosen by ``arch``
(:class:`~lightning_diag.testbeds.transformers.TinyGPT`, :class:`~lightning_diag.testbeds.transformers.MHAGPT`,
or :class:`~lightning_diag.testbeds.recurrent.RNNLM` with an LSTM or a GRU), the training by the
settings of :class:`~lightning_diag.testbeds.training.TestbedModule` (AdamW or SGD, constant
learning rate, warm-up, exponential range-test ramp, shock).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_diag.testbeds.data import CharDataset, stdlib_text
from lightning_diag.testbeds.recurrent import RNNLM
from lightning_diag.testbeds.training import TestbedModule, check_training_args
from lightning_diag.testbeds.transformers import MHAGPT, TinyGPT

__all__ = ["ARCHS", "CharLM"]

ARCHS = ("gpt", "mha", "lstm", "gru")


class CharLM(TestbedModule):
    """A character model trained on the Python standard library, AdamW by default.

    The learning rate follows :func:`~lightning_diag.testbeds.training.lr_at_step`: constant
    (``lr``), or with ``lr_end`` an exponential ramp from ``lr`` to ``lr_end`` over ``ramp_steps``
    steps (the learning-rate range test, which always diverges; DESIGN.md sections 5 and 7), with an
    optional linear warm-up and shock. No gradient clipping; no weight decay by default (AdamW decays
    2-D weights only). The model is initialised from ``seed`` (the global RNG is left alone) and the
    training windows are drawn from ``seed`` too, so a run is reproducible without
    ``seed_everything``. Training logs ``train_loss`` (the cross-entropy) every step. On CPU, call
    :func:`~lightning_diag.testbeds.training.flush_denormals` first for high learning rates.

    Args:
        arch: ``"gpt"`` (:class:`TinyGPT`, attention by ``F.scaled_dot_product_attention``),
            ``"mha"`` (:class:`MHAGPT`, ``nn.TransformerEncoderLayer``), ``"lstm"`` or ``"gru"``
            (:class:`RNNLM`; ``n_head``, ``block_size`` limits, ``qk_layernorm``, ``norm_first`` unused).
        n_layer, n_head, n_embd, block_size, qk_layernorm, norm_first: network sizes and shape.
        optimizer: ``"adamw"`` (``betas``, ``eps``) or ``"sgd"`` (``momentum``).
        lr, lr_end, ramp_steps, warmup_steps, shock_step, shock_factor: the learning-rate schedule.
        weight_decay: decoupled (AdamW) or L2 (SGD) decay of the 2-D weights.
        z_loss: weight of the z-loss ``mean(logsumexp(logits)^2)`` added to the returned loss
            (PaLM; Wortsman et al.'s output-logit stabiliser); 0 disables it.
        batch_size: windows per step.
        max_chars: length of the :func:`stdlib_text` corpus.
        num_windows: training windows per epoch.
        seed: seed of the initialisation and of the window offsets.
        text: a corpus to use instead of :func:`stdlib_text` (small tests); not saved in the
            hyperparameters, so a checkpoint of such a model reloads with ``text=`` passed again.

    Example:
        >>> model = CharLM(lr=1e-4, lr_end=3.0, ramp_steps=2000, max_chars=10_000)
        >>> model.model.lm_head.out_features == model.vocab_size
        True
    """

    def __init__(
        self,
        arch: Literal["gpt", "mha", "lstm", "gru"] = "gpt",
        n_layer: int = 3,
        n_head: int = 4,
        n_embd: int = 64,
        block_size: int = 64,
        qk_layernorm: bool = False,
        norm_first: bool = True,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        lr_end: float | None = None,
        ramp_steps: int = 2000,
        warmup_steps: int = 0,
        shock_step: int | None = None,
        shock_factor: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        z_loss: float = 0.0,
        batch_size: int = 16,
        max_chars: int = 2_000_000,
        num_windows: int = 200_000,
        seed: int = 0,
        text: str | None = None,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"`arch` must be one of {ARCHS}, got {arch!r}")
        check_training_args(optimizer=optimizer, lr=lr, lr_end=lr_end, ramp_steps=ramp_steps,
                            warmup_steps=warmup_steps, shock_step=shock_step, shock_factor=shock_factor)  # fmt: skip
        if z_loss < 0:
            raise ValueError(f"`z_loss` must be >= 0, got {z_loss!r}")
        self.save_hyperparameters(ignore=["text"])
        self.dataset = CharDataset(text if text is not None else stdlib_text(max_chars), block_size, num_windows, seed)
        self.vocab_size = self.dataset.vocab_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model: nn.Module
            if arch == "gpt":
                self.model = TinyGPT(self.vocab_size, block_size, n_layer, n_head, n_embd, qk_layernorm, norm_first)
            elif arch == "mha":
                self.model = MHAGPT(self.vocab_size, block_size, n_layer, n_head, n_embd, norm_first)
            else:
                self.model = RNNLM(self.vocab_size, arch, n_layer, n_embd)

    def forward(self, idx: Tensor) -> Tensor:
        """Next-character logits, (B, T, vocab_size)."""
        return self.model(idx)

    def loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        inputs, targets = batch
        logits = self.model(inputs)
        cross_entropy = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        if self.hparams.z_loss > 0:
            return cross_entropy, cross_entropy + self.hparams.z_loss * torch.logsumexp(logits, dim=-1).square().mean()
        return cross_entropy, cross_entropy

    def parameter_groups(self) -> list[dict]:
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.hparams.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.hparams.batch_size, shuffle=False, num_workers=0)
