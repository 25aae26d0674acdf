"""Tests of the testbed models, data and schedules (lightning_diag/testbeds/); the whole file runs in seconds.

The suite's machinery (labels, recording, detectors, scoring) is tested in tests/testbeds/."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_diag.testbeds import (
    MHAGPT,
    RNNLM,
    CharDataset,
    CharLM,
    DigitsClassifier,
    DigitsCNN,
    TinyGPT,
    digits_splits,
    divergence_step,
    lr_at_step,
    stdlib_text,
)

SMALL_TEXT_CHARS = 100_000


@pytest.fixture
def one_thread():
    """Run on one intra-op thread: these models are too small to gain from two, and two OpenMP threads
    on a busy 2-core machine spin-wait (a 30-step CharLM fit took ~35 s with two, ~5 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quiet_trainer(max_steps: int, **overrides) -> pl.Trainer:
    kwargs = dict(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


class RecordSteps(pl.Callback):
    """Records the training loss and the learning rate that each optimizer step used."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.lrs: list[tuple[int, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append((trainer.global_step, optimizer.param_groups[0]["lr"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


# ------------------------------------------------------------------------------------ text, data


def test_stdlib_text_is_nonempty_deterministic_and_truncated():
    text = stdlib_text(5_000)
    assert len(text) == 5_000 and text.strip()
    stdlib_text.cache_clear()
    assert stdlib_text(5_000) == text  # re-read from disk, not just the cache
    assert stdlib_text(20_000)[:5_000] == text  # a longer corpus extends the shorter one
    assert "def " in stdlib_text(SMALL_TEXT_CHARS)


def test_stdlib_text_rejects_bad_length():
    with pytest.raises(ValueError, match="max_chars"):
        stdlib_text(0)


def test_char_dataset_windows_are_next_character_targets_at_seeded_offsets():
    text = stdlib_text(SMALL_TEXT_CHARS)
    data = CharDataset(text, block_size=32, num_windows=100, seed=0)
    assert data.vocab_size == len(set(text)) and list(data.chars) == sorted(set(text))
    x, y = data[7]
    assert x.shape == y.shape == (32,) and x.dtype == torch.long
    start = int(data.offsets[7])
    assert data.decode(x) == text[start : start + 32] and data.decode(y) == text[start + 1 : start + 33]
    assert torch.equal(CharDataset(text, 32, 100, seed=0).offsets, data.offsets)
    assert not torch.equal(CharDataset(text, 32, 100, seed=1).offsets, data.offsets)
    assert data.decode(data.encode("import os")) == "import os"


# ---------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_gpt_forward_shape_and_causal_masking(qk_layernorm):
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32, qk_layernorm=qk_layernorm).eval()
    idx = torch.randint(0, 20, (3, 12))
    logits = model(idx)
    assert logits.shape == (3, 12, 20) and torch.isfinite(logits).all()
    changed = idx.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 20  # a future token for positions 0..7
    new_logits = model(changed)
    torch.testing.assert_close(new_logits[:, :8], logits[:, :8], rtol=0, atol=1e-6)
    assert not torch.allclose(new_logits[:, 8:], logits[:, 8:])


def test_gpt_module_names_and_qk_layernorm_switch():
    plain = TinyGPT(vocab_size=11, n_layer=2)
    linears = [name for name, m in plain.named_modules() if isinstance(m, nn.Linear)]
    assert linears == [
        "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc", "blocks.0.mlp.proj",
        "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc", "blocks.1.mlp.proj", "lm_head",
    ]  # fmt: skip
    assert isinstance(plain.blocks[0].attn.q_norm, nn.Identity)
    normed = TinyGPT(vocab_size=11, n_layer=2, qk_layernorm=True)
    k_norm = normed.blocks[1].attn.k_norm
    assert isinstance(k_norm, nn.LayerNorm) and k_norm.normalized_shape == (16,)
    assert plain.lm_head.weight is not plain.tok_emb.weight


def test_gpt_qk_layernorm_bounds_attention_logits_when_weights_blow_up():
    torch.manual_seed(0)
    models = {qk: TinyGPT(vocab_size=20, block_size=16, n_layer=1, qk_layernorm=qk) for qk in (False, True)}
    for model in models.values():
        with torch.no_grad():
            model.blocks[0].attn.qkv.weight.mul_(1_000)
    seen: dict[bool, float] = {}
    for qk, model in models.items():
        attn = model.blocks[0].attn
        captured: dict[str, torch.Tensor] = {}
        attn.q_norm.register_forward_hook(lambda m, i, out: captured.__setitem__("q", out))
        attn.k_norm.register_forward_hook(lambda m, i, out: captured.__setitem__("k", out))
        model(torch.randint(0, 20, (2, 16)))
        seen[qk] = float(
            (captured["q"].detach() @ captured["k"].transpose(-1, -2)).abs().max() / math.sqrt(attn.head_dim)
        )
    assert seen[True] <= 16 + 1e-3  # |q.k| / sqrt(d) <= sqrt(d) for unit-variance q, k (identity affine)
    assert seen[False] > 100 * seen[True]


def test_gpt_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_head"):
        TinyGPT(vocab_size=10, n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="block_size"):
        TinyGPT(vocab_size=10, block_size=8)(torch.zeros(1, 9, dtype=torch.long))


# --------------------------------------------------------------------------------------- CharLM


def test_charlm_initialisation_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = CharLM(max_chars=SMALL_TEXT_CHARS, seed=0)
    assert torch.equal(torch.rand(1), expected)
    b, c = CharLM(max_chars=SMALL_TEXT_CHARS, seed=0), CharLM(max_chars=SMALL_TEXT_CHARS, seed=1)
    assert torch.equal(a.model.blocks[0].mlp.fc.weight, b.model.blocks[0].mlp.fc.weight)
    assert not torch.equal(a.model.blocks[0].mlp.fc.weight, c.model.blocks[0].mlp.fc.weight)


def test_charlm_short_fit_lowers_the_loss_at_a_small_lr(one_thread):
    model = CharLM(lr=3e-3, max_chars=SMALL_TEXT_CHARS, seed=0)
    record = RecordSteps()
    quiet_trainer(30, callbacks=[record]).fit(model)
    assert len(record.losses) == 30 and all(map(math.isfinite, record.losses))
    assert math.isclose(record.losses[0], math.log(model.vocab_size), rel_tol=0.05)  # uniform at init
    assert sum(record.losses[-5:]) / 5 < 0.85 * sum(record.losses[:5]) / 5


def test_charlm_lr_ramp_follows_the_closed_form(one_thread):
    lr_start, lr_end, ramp_steps = 1e-4, 3.0, 20
    model = CharLM(lr=lr_start, lr_end=lr_end, ramp_steps=ramp_steps, n_layer=1, block_size=16, batch_size=2,
                   max_chars=SMALL_TEXT_CHARS)  # fmt: skip
    record = RecordSteps()
    quiet_trainer(25, callbacks=[record]).fit(model)
    assert [step for step, _ in record.lrs] == list(range(25))
    for step, lr in record.lrs:
        expected = lr_start * (lr_end / lr_start) ** (min(step, ramp_steps) / ramp_steps)
        assert lr == pytest.approx(expected, rel=1e-9), step
    assert record.lrs[-1][1] == pytest.approx(lr_end)  # held after the ramp


def test_lr_at_step_constant_ramp_and_warmup():
    assert lr_at_step(500, 1e-3) == 1e-3
    assert lr_at_step(0, 1e-4, 3.0, 2000) == pytest.approx(1e-4)
    assert lr_at_step(1000, 1e-4, 3.0, 2000) == pytest.approx(1e-4 * 30_000**0.5)
    assert lr_at_step(2000, 1e-4, 3.0, 2000) == lr_at_step(5000, 1e-4, 3.0, 2000) == pytest.approx(3.0)
    assert lr_at_step(4, 1e-3, warmup_steps=10) == pytest.approx(5e-4)
    assert lr_at_step(10, 1e-3, warmup_steps=10) == 1e-3


def test_charlm_rejects_bad_schedule():
    with pytest.raises(ValueError, match="lr_end"):
        CharLM(lr=1e-4, lr_end=-1.0, text="abc" * 100)
    with pytest.raises(ValueError, match="ramp_steps"):
        CharLM(lr=1e-4, lr_end=1.0, ramp_steps=0, text="abc" * 100)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_charlm_z_loss_is_added_to_the_returned_loss_only():
    model = CharLM(z_loss=1e-2, n_layer=1, block_size=16, max_chars=SMALL_TEXT_CHARS)
    batch = next(iter(model.train_dataloader()))
    with torch.no_grad():
        logits = model(batch[0])
        cross_entropy = nn.functional.cross_entropy(logits.flatten(0, 1), batch[1].flatten())
        returned = model.training_step(batch, 0)
    expected = cross_entropy + 1e-2 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(returned, expected)


# ------------------------------------------------------------------------------ divergence_step


@pytest.mark.parametrize(
    ("losses", "expected"),
    [
        ([4.0, 3.0, 2.0, 1.0, 1.1, 0.9], None),
        ([4.0, 3.0, 1.0, 3.5, 1.0, 3.5, 3.5], None),  # excursions shorter than patience
        ([4.0, 2.0, 1.0, 3.5, 3.5, 3.5, 3.5], 3),
        ([4.0, 2.0, 1.0, 1.0, float("nan"), 5.0], 4),
        ([4.0, 2.0, 1.0, 3.5, float("inf")], 3),  # the climb that ended in inf started at 3
        (torch.tensor([4.0, 2.0, 1.0, 3.5, 3.5, 3.5, 3.5]), 3),
    ],
)
def test_divergence_step(losses, expected):
    assert divergence_step(losses, factor=3.0, patience=4) == expected


# ----------------------------------------------------------------------------------- digits


def test_digits_classifier_fits_and_accuracy_rises(one_thread):
    model = DigitsClassifier(seed=0)
    loss_before, accuracy_before = model.evaluate("val")
    assert accuracy_before < 0.3 and len(model.val_data) == 360
    quiet_trainer(40, limit_val_batches=0).fit(model)
    loss_after, accuracy_after = model.evaluate("val")
    assert accuracy_after > 0.8 and loss_after < 0.5 * loss_before


def test_digits_classifier_diverges_at_too_large_a_step(one_thread):
    model = DigitsClassifier(lr=5.0, momentum=0.0, seed=0)
    record = RecordSteps()
    quiet_trainer(20, limit_val_batches=0, callbacks=[record]).fit(model)
    assert record.losses[0] < 3 and divergence_step(record.losses) is not None


def test_digits_classifier_is_deterministic_and_exposes_penultimate_features():
    a, b = DigitsClassifier(seed=3), DigitsClassifier(seed=3)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert torch.equal(next(iter(a.train_dataloader()))[1], next(iter(b.train_dataloader()))[1])
    x = a.val_data.tensors[0][:5]
    torch.testing.assert_close(a(x), a.classifier(a.features(x)))
    assert a.features(x).shape == (5, 64)
    mean = a.train_data.tensors[0].mean(0)
    assert mean.abs().max() < 1e-5  # standardised with the training statistics


# ------------------------------------------------------------------------- the other testbeds


def _causal(model: nn.Module, vocab: int = 20, T: int = 12) -> bool:
    """Whether changing the last token leaves every earlier position's logits unchanged."""
    torch.manual_seed(0)
    idx = torch.randint(0, vocab, (2, T))
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % vocab
    with torch.no_grad():
        a, b = model(idx), model(changed)
    return torch.allclose(a[:, :-1], b[:, :-1], atol=1e-5) and not torch.allclose(a[:, -1], b[:, -1], atol=1e-5)


@pytest.mark.parametrize("norm_first", [True, False])
def test_every_language_model_is_causal(norm_first):
    torch.manual_seed(0)
    assert _causal(TinyGPT(vocab_size=20, block_size=16, n_layer=2, n_embd=16, norm_first=norm_first))
    assert _causal(MHAGPT(vocab_size=20, block_size=16, n_layer=2, n_embd=16, norm_first=norm_first))
    assert _causal(RNNLM(vocab_size=20, cell="lstm" if norm_first else "gru", n_embd=16))


def test_post_ln_blocks_end_in_a_layernorm_and_drop_the_final_one():
    post = TinyGPT(vocab_size=10, block_size=8, n_layer=1, n_embd=16, norm_first=False)
    assert isinstance(post.ln_f, nn.Identity)
    with torch.no_grad():
        out = post.blocks[0](torch.randn(2, 8, 16) * 5)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 8), atol=1e-5, rtol=0)  # LayerNorm output
    mha = MHAGPT(vocab_size=10, block_size=8, n_layer=1, n_embd=16, norm_first=False)
    assert isinstance(mha.ln_f, nn.Identity) and not mha.layers[0].norm_first
    assert isinstance(mha.layers[0].self_attn, nn.MultiheadAttention)


def test_rnn_lm_has_the_head_as_its_only_linear_and_rejects_unknown_cells():
    model = RNNLM(vocab_size=10, cell="gru", n_layer=2, n_embd=8)
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] == ["lm_head"]
    assert isinstance(model.rnn, nn.GRU) and model.rnn.num_layers == 2
    with pytest.raises(ValueError, match="cell"):
        RNNLM(vocab_size=10, cell="rnn")


@pytest.mark.parametrize("arch", ["gpt", "mha", "lstm", "gru"])
def test_charlm_builds_every_arch_and_trains_two_steps(arch):
    model = CharLM(arch=arch, n_layer=1, n_embd=16, block_size=16, batch_size=4, max_chars=SMALL_TEXT_CHARS,
                   optimizer="sgd" if arch in ("lstm", "gru") else "adamw", lr=0.1)  # fmt: skip
    record = RecordSteps()
    quiet_trainer(2, callbacks=[record]).fit(model)
    assert len(record.losses) == 2 and all(map(math.isfinite, record.losses))
    optimizer = model.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD if arch in ("lstm", "gru") else torch.optim.AdamW)
    with pytest.raises(ValueError, match="arch"):
        CharLM(arch="rwkv", text="abc" * 100)


def test_charlm_adamw_settings_reach_the_optimizer():
    model = CharLM(n_layer=1, n_embd=16, block_size=16, betas=(0.9, 0.999), eps=1e-12, weight_decay=0.1,
                   max_chars=SMALL_TEXT_CHARS)  # fmt: skip
    optimizer = model.configure_optimizers()["optimizer"]
    decayed, plain = optimizer.param_groups
    assert decayed["betas"] == (0.9, 0.999) and decayed["eps"] == 1e-12
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim < 2 for p in plain["params"])


def test_lr_shock_multiplies_the_schedule_from_its_step():
    assert lr_at_step(149, 0.05, shock_step=150, shock_factor=10.0) == pytest.approx(0.05)
    assert lr_at_step(150, 0.05, shock_step=150, shock_factor=10.0) == pytest.approx(0.5)
    assert lr_at_step(400, 0.05, shock_step=150, shock_factor=10.0) == pytest.approx(0.5)


def test_digits_models_follow_the_shock_schedule(one_thread):
    model = DigitsClassifier(lr=0.05, hidden=(16,), shock_step=3, shock_factor=10.0)
    record = RecordSteps()
    quiet_trainer(5, limit_val_batches=0, callbacks=[record]).fit(model)
    assert [lr for _, lr in record.lrs] == pytest.approx([0.05, 0.05, 0.05, 0.5, 0.5])


def test_poisoned_batch_is_scaled_and_mislabelled_only_at_its_step(one_thread):
    class Spy(DigitsClassifier):
        def loss(self, batch):
            self.seen.append(float(batch[0].abs().max()))
            return super().loss(batch)

    model = Spy(poison_step=2, poison_scale=1000.0, hidden=(16,), lr=1e-4)
    model.seen = []
    x, y = model.train_data.tensors[0][:8], model.train_data.tensors[1][:8]
    poisoned_x, poisoned_y = model.poison((x, y))
    torch.testing.assert_close(poisoned_x, 1000 * x)
    assert torch.equal(poisoned_y, (y + 1) % 10)
    quiet_trainer(4, limit_val_batches=0).fit(model)
    assert model.seen[2] > 100 * max(model.seen[:2] + model.seen[3:])
    with pytest.raises(NotImplementedError, match="poisoned"):
        CharLM(text="abc" * 100, n_layer=1, block_size=8).poison((x, y))


def test_digits_cnn_sees_images_and_trains(one_thread):
    train, _ = digits_splits(0.2, 0, images=True)
    assert train.tensors[0].shape[1:] == (1, 8, 8)
    model = DigitsCNN(channels=4, seed=0)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.features.modules())
    loss_before, _ = model.evaluate("val")
    quiet_trainer(30, limit_val_batches=0).fit(model)
    loss_after, accuracy = model.evaluate("val")
    assert loss_after < 0.7 * loss_before and accuracy > 0.6


def test_testbeds_reject_bad_training_settings():
    with pytest.raises(ValueError, match="optimizer"):
        DigitsClassifier(optimizer="lion")
    with pytest.raises(ValueError, match="poison_step"):
        DigitsCNN(poison_step=-1)
    with pytest.raises(ValueError, match="shock_factor"):
        CharLM(text="abc" * 100, shock_step=3, shock_factor=0.0)
