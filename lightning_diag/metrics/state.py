"""Declared state for the host-side decision objects (the torchmetrics habit, on numpy).

A decision object (a baseline, a window, a rule) names its running state once with
:meth:`Stateful.add_state`; ``reset``, ``state_dict``, ``load_state_dict`` and growing to more
streams all derive from those declarations, so adding a field cannot forget the checkpoint.

Decisions live on the host in float64 numpy: the device measures, a few floats per step travel to
the host without a sync (``callbacks/_base.py``), and every rule of a monitor is one numpy pass
there, instead of dozens of one-scalar kernels per step on the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Stateful"]


class Stateful:
    """Base of objects whose running state is a few named numpy arrays of ``size`` streams.

    Example:
        >>> class Counter(Stateful):
        ...     def __init__(self, size):
        ...         self.add_state("hits", 0, size=size)
        >>> c = Counter(2); c.hits += 1; c.grow(3); c.hits.tolist()
        [1, 1, 0]
    """

    def add_state(self, name: str, fill: float | int | bool, *, size: int | None = None, dtype: Any = None) -> None:
        """Declare ``name``: an array of ``size`` streams (``None``: one scalar) filled with ``fill``."""
        declared = self.__dict__.setdefault("_declared", {})
        declared[name] = (fill, np.dtype(dtype) if dtype is not None else np.asarray(fill).dtype, size is not None)
        if size is not None:
            self._size = size
        setattr(self, name, self._fresh(name, size))

    def _fresh(self, name: str, size: int | None) -> np.ndarray:
        fill, dtype, per_stream = self._declared[name]
        return np.full(size, fill, dtype) if per_stream else np.full((), fill, dtype)

    @property
    def size(self) -> int | None:
        """Number of streams (``None`` when every declared state is a scalar)."""
        return self.__dict__.get("_size")

    def reset(self) -> None:
        """Every declared array back to its fill value."""
        for name in self._declared:
            setattr(self, name, self._fresh(name, self.size))

    def grow(self, size: int) -> None:
        """Follow ``size`` streams: existing streams keep their state, new ones start fresh."""
        if self.size is None or size == self.size:
            return
        for name, (_, _, per_stream) in self._declared.items():
            if not per_stream:
                continue
            old = getattr(self, name)
            new = self._fresh(name, size)
            keep = min(size, old.shape[0])
            new[:keep] = old[:keep]
            setattr(self, name, new)
        self._size = size

    def state_dict(self) -> dict[str, Any]:
        """Plain Python lists and numbers: a checkpoint loads with ``torch.load(weights_only=True)``."""
        return {name: getattr(self, name).tolist() for name in self._declared}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the declared arrays; a checkpoint of another shape raises (nothing is changed)."""
        arrays = {
            name: np.asarray(state[name], dtype=self._declared[name][1]) for name in self._declared if name in state
        }
        for name, array in arrays.items():
            if array.shape != getattr(self, name).shape:
                raise ValueError(
                    f"{type(self).__name__}: saved {name!r} has shape {array.shape}, "
                    f"expected {getattr(self, name).shape}"
                )
        for name, array in arrays.items():
            setattr(self, name, array.copy())
