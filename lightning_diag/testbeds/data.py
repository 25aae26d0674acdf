"""The data of the testbeds, all of it shipped with Python or scikit-learn (nothing is downloaded).

- :func:`stdlib_text`: the source of Python's standard library, for character-level language models;
  :class:`CharDataset` cuts it into seeded fixed-length windows.
- :func:`digits_splits`: scikit-learn's bundled 8x8 digits, standardised, as flat vectors or images.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

__all__ = ["CharDataset", "digits_splits", "stdlib_text"]

# Directories under the stdlib folder that hold third-party code, not the standard library.
_NOT_STDLIB = frozenset({"site-packages", "dist-packages", "__pycache__"})



@functools.lru_cache(maxsize=4)
def stdlib_text(max_chars: int = 2_000_000) -> str:
    """The source of Python's standard library as one string, truncated to ``max_chars``.

    Files are the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]`` (site-packages
    excluded), read as UTF-8 in sorted relative-path order and joined with a newline, so the text is
    the same on every call for a given Python installation. Nothing is downloaded; results are
    cached.

    Args:
        max_chars: length of the returned text (shorter only if the whole library is shorter).

    Example:
        >>> text = stdlib_text(1_000)
        >>> len(text), text == stdlib_text(1_000)
        (1000, True)
    """
    if not isinstance(max_chars, int) or max_chars <= 0:
        raise ValueError(f"`max_chars` must be a positive int, got {max_chars!r}")
    root = sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__)
    if not os.path.isfile(os.path.join(root, "os.py")):
        root = os.path.dirname(os.__file__)
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [s for s in subfolders if s not in _NOT_STDLIB]
        paths += [os.path.relpath(os.path.join(folder, f), root) for f in files if f.endswith(".py")]
    parts: list[str] = []
    total = 0
    for path in sorted(p.replace(os.sep, "/") for p in paths):
        try:
            with open(os.path.join(root, path), encoding="utf-8") as handle:
                source = handle.read()
        except (OSError, UnicodeDecodeError):  # a few test files are deliberately not UTF-8
            continue
        parts.append(source)
        total += len(source) + 1
        if total >= max_chars:
            break
    if not parts:
        raise RuntimeError(f"no readable Python source files found under {root!r}")
    return "\n".join(parts)[:max_chars]


class CharDataset(Dataset):
    """Fixed-length windows of a text as (inputs, next-character targets), at seeded random offsets.

    The vocabulary is the sorted set of characters in ``text``. Window ``i`` starts at an offset
    drawn once, from ``seed``, for every ``i``; the dataset is therefore deterministic and a
    ``DataLoader`` without shuffling replays the same batches.

    Args:
        text: the corpus.
        block_size: window length T; inputs are ``text[s:s+T]`` and targets ``text[s+1:s+T+1]``.
        num_windows: length of the dataset.
        seed: seed of the window offsets.

    Example:
        >>> data = CharDataset("hello world, " * 10, block_size=8, num_windows=4)
        >>> x, y = data[0]
        >>> x.shape, bool((x[1:] == y[:-1]).all()), data.decode(data.encode("hello")) == "hello"
        (torch.Size([8]), True, True)
    """

    def __init__(self, text: str, block_size: int = 64, num_windows: int = 200_000, seed: int = 0) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"`block_size` must be a positive int, got {block_size!r}")
        if len(text) < block_size + 1:
            raise ValueError(f"`text` has {len(text)} characters; a window needs block_size + 1 = {block_size + 1}")
        if not isinstance(num_windows, int) or num_windows < 1:
            raise ValueError(f"`num_windows` must be a positive int, got {num_windows!r}")
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        alphabet = np.unique(codepoints)
        self.chars: str = "".join(map(chr, alphabet.tolist()))
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.chars)}
        self.data: Tensor = torch.from_numpy(np.searchsorted(alphabet, codepoints).astype(np.int32))
        self.block_size = block_size
        generator = torch.Generator().manual_seed(seed)
        self.offsets: Tensor = torch.randint(0, len(text) - block_size, (num_windows,), generator=generator)

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.chars)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        start = int(self.offsets[index])
        window = self.data[start : start + self.block_size + 1].long()
        return window[:-1], window[1:]

    def encode(self, text: str) -> Tensor:
        """Character ids of ``text`` (every character must be in the vocabulary)."""
        return torch.tensor([self.stoi[c] for c in text], dtype=torch.long)

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """The text of a sequence of character ids."""
        return "".join(self.chars[int(i)] for i in ids)


@functools.lru_cache(maxsize=8)
def digits_splits(
    val_fraction: float = 0.2, seed: int = 0, images: bool = False
) -> tuple[TensorDataset, TensorDataset]:
    """Stratified train/validation split of scikit-learn's digits, standardised per pixel.

    1,797 images of 8x8 pixels, 10 classes. The mean and std come from the training split (blank
    corner pixels keep std 1). ``images=True`` shapes the inputs (N, 1, 8, 8) for convolutions,
    otherwise (N, 64). Cached: the same arguments return the same datasets.

    Example:
        >>> train, val = digits_splits(0.2, seed=0, images=True)
        >>> train.tensors[0].shape[1:], len(train) + len(val)
        (torch.Size([1, 8, 8]), 1797)
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction!r}")
    from sklearn.datasets import load_digits  # lazy: scikit-learn is a dev extra
    from sklearn.model_selection import train_test_split

    pixels, labels = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(
        pixels, labels, test_size=val_fraction, random_state=seed, stratify=labels
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0  # corner pixels that are always blank
    shape = (-1, 1, 8, 8) if images else (-1, 64)

    def as_data(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        inputs = torch.as_tensor((x - mean) / std, dtype=torch.float32).reshape(shape)
        return TensorDataset(inputs, torch.as_tensor(y, dtype=torch.long))

    return as_data(x_train, y_train), as_data(x_val, y_val)
