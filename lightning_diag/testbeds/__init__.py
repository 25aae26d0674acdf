"""Small real models and data for the demo, the benchmarks, the early-warning suite and the tests.

Every testbed trains on a laptop CPU in seconds to a minute, on data that ships with Python or
scikit-learn (DESIGN.md section 7):

- :mod:`~lightning_diag.testbeds.language`: :class:`CharLM`, character-level language modelling
  on Python's own standard-library source (:func:`stdlib_text`), with a hand-written GPT
  (:class:`TinyGPT`, ``F.scaled_dot_product_attention``, pre- or post-LN, optional qk-layernorm),
  a GPT of ``nn.TransformerEncoderLayer`` (:class:`MHAGPT`), or an LSTM/GRU (:class:`RNNLM`).
- :mod:`~lightning_diag.testbeds.vision`: :class:`DigitsClassifier` (MLP) and :class:`DigitsCNN`
  (``Conv2d`` + BatchNorm) on scikit-learn's 8x8 digits.
- :mod:`~lightning_diag.testbeds.training`: the shared optimizer, learning-rate schedule
  (:func:`lr_at_step`: constant, warm-up, range-test ramp, shock), poisoned batch, and
  :func:`flush_denormals`, the CPU speed switch that high-learning-rate runs need.
- :mod:`~lightning_diag.testbeds.labels`: the ground truth of the early-warning suite,
  :func:`explosion_step` and :func:`healthy_end` (and the demo's :func:`divergence_step`).
- :mod:`~lightning_diag.testbeds.recording`: per-step recording of a run and its monitors.
- :mod:`~lightning_diag.testbeds.detectors` and :mod:`~lightning_diag.testbeds.scoring`: detectors
  replayed on recorded runs, and leave-one-family-out scoring.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_diag.testbeds import CharLM
    >>> model = CharLM(text="def f(x):\\n    return x + 1\\n" * 50, n_layer=1, block_size=16, batch_size=4)
    >>> trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
    ...                      enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(model)
    >>> trainer.global_step
    2
"""

from lightning_diag.testbeds.data import CharDataset, digits_splits, stdlib_text
from lightning_diag.testbeds.labels import divergence_step, explosion_step, healthy_end
from lightning_diag.testbeds.language import CharLM
from lightning_diag.testbeds.recurrent import RNNLM
from lightning_diag.testbeds.training import TestbedModule, flush_denormals, lr_at_step
from lightning_diag.testbeds.transformers import MHAGPT, TinyGPT
from lightning_diag.testbeds.vision import DigitsClassifier, DigitsCNN

__all__ = [
    "MHAGPT",
    "RNNLM",
    "CharDataset",
    "CharLM",
    "DigitsCNN",
    "DigitsClassifier",
    "TestbedModule",
    "TinyGPT",
    "digits_splits",
    "divergence_step",
    "explosion_step",
    "flush_denormals",
    "healthy_end",
    "lr_at_step",
    "stdlib_text",
]
