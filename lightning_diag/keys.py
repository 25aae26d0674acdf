"""The one key scheme, and the declarations that the docs, the dashboard and the report derive from.

Every figure a monitor logs is ``<family>/<figure>`` (model level) or ``<family>/<figure>/<layer>``
(one per layer; ``<layer>`` is a module name such as ``blocks.0.mlp.fc``). A module name may hold
a ``/`` (``nn.ModuleDict({"enc/0": ...})``), so a layer is written in a key with ``/`` as ``%2F`` and
``%`` as ``%25`` (:func:`layer_in_key`, reversed by :func:`split_key`): a key never has more than three
parts, whatever the model.
``<family>`` is the monitor's namespace (``grad_norm``, ``loss_spike``, ``spectral_alignment``,
``nc``, ...), so TensorBoard and W&B group a monitor's figures in one section, and a key's depth
says what it is: two parts, a model-level figure; three, a per-layer one. A monitor *declares* its
keys once, as :class:`Key` records relative to its family; the README table, the class docstrings,
the TensorBoard dashboard and the report's layer/summary split are generated from those
declarations, and a test checks that every logged key matches one.

Example:
    >>> key = Key("layer/{layer}", "L2 norm of the layer's gradients", chart="gradient norm per layer")
    >>> key.full("grad_norm"), key.per_layer, key.matches("grad_norm/layer/blocks.0.fc", "grad_norm")
    ('grad_norm/layer/{layer}', True, True)
    >>> split_key("grad_norm/layer/blocks.0.fc"), split_key("grad_norm/total")
    (('grad_norm', 'layer', 'blocks.0.fc'), ('grad_norm', 'total', None))
    >>> key.key("grad_norm", "enc/0"), split_key("grad_norm/layer/enc%2F0")
    ('grad_norm/layer/enc%2F0', ('grad_norm', 'layer', 'enc/0'))
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["LAYER", "Key", "Kind", "Rate", "keys_section", "keys_table", "layer_in_key", "layer_keys", "split_key"]

LAYER = "{layer}"
_ESCAPED = re.compile("%(25|2F)")

Kind = Literal["scalar", "histogram", "image"]
# How often a scalar is known, which is also how often rules see it:
#   "step"  every optimizer step (a stream: reaches the host asynchronously, every step)
#   "check" every check of the monitor (its own cadence; a stream too)
#   "eval"  every evaluation (NCTracker: validation epochs or probe passes)
#   "log"   logging steps only (a figure: read in the one host transfer of a logging step)
Rate = Literal["step", "check", "eval", "log"]
_RATE_TEXT = {"step": "every step", "check": "every check", "eval": "every evaluation", "log": "logging steps"}
_HEAD = ("key", "meaning", "known (rules see it)")


@dataclass(frozen=True)
class Key:
    """One declared key of a monitor, relative to its family.

    Args:
        name: ``"<figure>"`` or ``"<figure>/{layer}"`` (the family is added by :meth:`full`).
        meaning: one line: what the figure is (the formula or the paper's name for it).
        chart: title of the dashboard chart that draws it (keys with one title share a chart);
            ``None``: not charted.
        rate: how often the value is known and seen by rules (see the module docstring).
        kind: ``"scalar"`` (every logger), ``"histogram"`` or ``"image"`` (TensorBoard only).
        requires: name of a boolean attribute of the monitor that enables the key (``None``:
            always logged); ``note`` says it in words for the docs.
        note: when the key is logged, in words (``"with clip='zclip'"``).
        host: computed on the host from the measured streams (z-scores, baselines, counters), not
            measured on the device; a replay of the monitor's decisions recomputes it.
    """

    name: str
    meaning: str
    chart: str | None = None
    rate: Rate = "log"
    kind: Kind = "scalar"
    requires: str | None = None
    note: str = ""
    host: bool = False

    def __post_init__(self) -> None:
        parts = self.name.split("/")
        if not 1 <= len(parts) <= 2 or not all(parts) or (len(parts) == 2) != (parts[-1] == LAYER):
            raise ValueError(f"a key is '<figure>' or '<figure>/{LAYER}', got {self.name!r}")

    @property
    def per_layer(self) -> bool:
        return self.name.endswith("/" + LAYER)

    @property
    def figure(self) -> str:
        return self.name.split("/")[0]

    def full(self, family: str) -> str:
        """The template with its family: ``"grad_norm/layer/{layer}"``."""
        return f"{family}/{self.name}"

    def key(self, family: str, layer: str | None = None) -> str:
        """The logged key, for ``layer`` (any module name, see :func:`layer_in_key`) if per-layer."""
        return f"{family}/{self.figure}/{layer_in_key(layer)}" if self.per_layer else f"{family}/{self.name}"

    def regex(self, family: str) -> str:
        """Regular expression of the logged keys (a layer is any run of characters but ``/``)."""
        return re.escape(f"{family}/{self.figure}") + ("/[^/]+$" if self.per_layer else "$")

    def matches(self, key: str, family: str) -> bool:
        return re.match(self.regex(family), key) is not None

    def describe(self) -> str:
        """The ``when`` column of the docs: rate, and the condition if any."""
        when = _RATE_TEXT[self.rate] if self.kind == "scalar" else f"{self.kind}, TensorBoard only"
        return f"{when}, {self.note}" if self.note else when


def layer_in_key(layer: str) -> str:
    """How a layer is written in a key: its name with ``%`` as ``%25`` and ``/`` as ``%2F`` (the one
    escaping: a ``/`` would add a part to the key; :func:`split_key` gives the name back)."""
    return str(layer).replace("%", "%25").replace("/", "%2F")


def split_key(key: str) -> tuple[str, str, str | None]:
    """``(family, figure, layer)`` of a logged key; ``layer`` is None for a model-level key, else the
    layer's name (:func:`layer_in_key` reversed).

    Raises:
        ValueError: the key is not ``family/figure`` or ``family/figure/layer``.
    """
    parts = key.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"{key!r} is not '<family>/<figure>' or '<family>/<figure>/<layer>'")
    layer = _ESCAPED.sub(lambda m: "%" if m[1] == "25" else "/", parts[2]) if len(parts) == 3 else None
    return parts[0], parts[1], layer


def keys_table(family: str, keys: Iterable[Key], *, rst: bool = False) -> str:
    """The key table of a monitor: key, meaning, and when it is logged; markdown or reStructuredText."""
    rows = [(f"``{k.key(family, '<layer>')}``" if rst else f"`{k.key(family, '<layer>')}`", k.meaning,
             k.describe()) for k in keys]  # fmt: skip
    if not rst:
        lines = ["| " + " | ".join(_HEAD) + " |", "|---|---|---|"]
        return "\n".join(lines + [f"| {a} | {b.replace('|', chr(92) + '|')} | {c} |" for a, b, c in rows])
    widths = [max(len(r[i]) for r in [_HEAD, *rows]) for i in range(3)]
    rule = "  ".join("=" * w for w in widths)
    body = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    head = "  ".join(cell.ljust(w) for cell, w in zip(_HEAD, widths)).rstrip()
    return "\n".join([rule, head, rule, *body, rule])


def layer_keys(family: str, keys: Sequence[Key], layers: Sequence[str]) -> list[str]:
    """Every logged key of ``keys`` for ``layers``, in declaration order (model-level keys once)."""
    return [k.key(family, layer) for k in keys for layer in (layers if k.per_layer else [None])]


def keys_section(monitors: Iterable[type]) -> str:
    """The README's key tables: one per monitor class (its ``family`` and ``KEYS``), plus the alert count.

    A test checks that the README holds exactly this text for every exported monitor between its
    ``<!-- keys:begin -->`` and ``<!-- keys:end -->`` markers (and prints it when it does not).
    """
    parts = []
    for cls in monitors:
        alerts = Key("alerts", "warning and critical alerts so far (info ones are recorded, not counted; TensorBoard "
                               "also gets each alert's text under this tag)", rate="step")
        rows = keys_table(cls.family, [*cls.KEYS, alerts])
        parts.append(f"**{cls.__name__}** (`{cls.family}/`)\n\n{rows}")
    return "\n\n".join(parts)

