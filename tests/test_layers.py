import pytest
from torch import nn

from lightning_diag.layers import group_parameters, validate_patterns


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(4, 4), "ln": nn.LayerNorm(4)}) for _ in range(2))
        self.head = nn.Linear(4, 2)
        self.scale = nn.Parameter(nn.init.ones_(nn.Linear(1, 1).weight))
        self.head.bias.requires_grad_(False)


def test_layers_are_owning_modules_in_parameter_order_and_frozen_params_are_skipped():
    groups = group_parameters(Net())
    # named_parameters order: the root module's own parameters come first
    assert groups.layers == ["scale", "emb", "blocks.0.fc", "blocks.0.ln", "blocks.1.fc", "blocks.1.ln", "head"]
    assert "head.bias" not in groups.names
    assert [groups.layers[i] for i in groups.layer_of] == [n.rpartition(".")[0] or n for n in groups.names]


def test_include_exclude_and_depth():
    groups = group_parameters(Net(), include=["blocks.*"], exclude=["*.bias"], depth=2)
    assert groups.layers == ["blocks.0", "blocks.1"]
    assert groups.names == ["blocks.0.fc.weight", "blocks.0.ln.weight", "blocks.1.fc.weight", "blocks.1.ln.weight"]
    assert group_parameters(Net(), include=["head"]).names == ["head.weight"]  # a layer name selects its params


@pytest.mark.parametrize("bad", [[""], [3], ("ok", None)])
def test_bad_patterns_are_rejected(bad):
    with pytest.raises(ValueError, match="glob patterns"):
        validate_patterns("include", bad)


def test_bad_depth_is_rejected():
    with pytest.raises(ValueError, match="depth"):
        group_parameters(Net(), depth=0)
