"""A recurrent character model: ``nn.LSTM`` or ``nn.GRU``, the classic home of exploding gradients.

Trained with plain SGD and no clipping (Pascanu et al. 2013), back-propagation through a whole
window makes the gradient a product of as many recurrent Jacobians as there are time steps: once
the recurrent weights' spectral radius passes 1 the gradient norm grows geometrically with the
window length, and a large enough step throws the weights into a region of huge loss.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["RNNLM"]

RNN_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


class RNNLM(nn.Module):
    """Embedding, a stacked ``nn.LSTM`` or ``nn.GRU`` (batch first), and a linear head.

    Modules: ``tok_emb`` (``nn.Embedding``, N(0, 1) as PyTorch initialises it), ``rnn`` (PyTorch's
    default initialisation, U(-1/sqrt(hidden), 1/sqrt(hidden))) and ``lm_head`` (``nn.Linear``).
    The head is the only ``nn.Linear``: monitors that watch linear layers see only it.

    Args:
        vocab_size: number of tokens.
        cell: ``"lstm"`` or ``"gru"``.
        n_layer: stacked recurrent layers.
        n_embd: embedding and hidden width.

    Example:
        >>> import torch
        >>> model = RNNLM(vocab_size=10, cell="gru", n_layer=1, n_embd=16)
        >>> model(torch.zeros(3, 5, dtype=torch.long)).shape
        torch.Size([3, 5, 10])
    """

    def __init__(self, vocab_size: int, cell: str = "lstm", n_layer: int = 1, n_embd: int = 64) -> None:
        super().__init__()
        if cell not in RNN_CELLS:
            raise ValueError(f"`cell` must be one of {tuple(RNN_CELLS)}, got {cell!r}")
        for name, value in (("vocab_size", vocab_size), ("n_layer", n_layer), ("n_embd", n_embd)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.rnn = RNN_CELLS[cell](n_embd, n_embd, num_layers=n_layer, batch_first=True)
        self.lm_head = nn.Linear(n_embd, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits of the next token, shape (B, T, vocab_size), for token ids ``idx`` of shape (B, T)."""
        hidden, _ = self.rnn(self.tok_emb(idx))
        return self.lm_head(hidden)
