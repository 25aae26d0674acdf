"""The docs cannot drift from the code: the README's key tables are the monitors' declarations."""

from __future__ import annotations

import re
from pathlib import Path

import lightning_diag.callbacks
from lightning_diag.keys import keys_section

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_key_tables_are_generated_from_the_declarations() -> None:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- keys:begin -->\n(.*)\n<!-- keys:end -->", text, re.S)
    assert found, "README.md lost its <!-- keys:begin --> / <!-- keys:end --> markers"
    expected = keys_section(getattr(lightning_diag.callbacks, n) for n in lightning_diag.callbacks.__all__)
    assert found.group(1) == expected, f"regenerate the README key tables; they are now:\n{expected}"


def test_class_docstrings_list_every_declared_key() -> None:
    for name in lightning_diag.callbacks.__all__:
        cls = getattr(lightning_diag.callbacks, name)
        for key in cls.KEYS:
            assert f"``{key.key(cls.family, '<layer>')}``" in cls.__doc__, (name, key.name)
