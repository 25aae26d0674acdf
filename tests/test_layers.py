import pytest
import torch
from torch import nn

from lightning_diag.layers import group_parameters, linear_maps, validate_patterns


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


# -- linear_maps: convolutions and recurrent layers ---------------------------------------------------


class ConvAndRecurrent(nn.Module):
    """Every kind of convolution and recurrent layer next to each other; the head ``out`` is excluded."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, (3, 2), stride=2, padding=1, dilation=(2, 1))
        self.grouped = nn.Conv2d(4, 4, 3, groups=2)
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4)
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.same = nn.Conv2d(4, 4, 3, padding="same")
        self.valid = nn.Conv2d(4, 4, 3, padding="valid")
        self.conv1d, self.conv3d = nn.Conv1d(4, 4, 3), nn.Conv3d(4, 4, 3)
        self.transposed = nn.ConvTranspose2d(4, 4, 3)
        self.lstm = nn.LSTM(5, 6, num_layers=2, bidirectional=True)
        self.gru = nn.GRU(5, 7, num_layers=2, batch_first=True)
        self.rnn = nn.RNN(5, 3, bidirectional=True)
        self.out = nn.Linear(6, 1)


def test_linear_maps_watch_plain_conv2d_patches_and_first_layer_recurrent_input_weights():
    model = ConvAndRecurrent()
    maps, head = linear_maps(model)
    assert [m.name for m in maps] == ["conv", "lstm.ih_l0", "lstm.ih_l0_reverse", "gru.ih_l0", "rnn.ih_l0",
                                      "rnn.ih_l0_reverse"]
    assert head == ("out", model.out)
    conv = maps[0]
    assert (conv.module, conv.kind, conv.param, conv.input) == (model.conv, "patches", "weight", 0)
    # (out, in * kh * kw) in F.unfold's order (channel, then kernel row, then column), a view of the weight
    assert torch.equal(conv.weight(), model.conv.weight.reshape(4, -1)) and conv.weight().shape == (4, 18)
    assert conv.weight().data_ptr() == model.conv.weight.data_ptr()
    for m in maps[1:]:
        rnn = getattr(model, m.name.partition(".")[0])
        assert (m.module, m.kind, m.input, m.input_name, m.rows) == (rnn, "rows", 0, "input", None)
        assert m.weight() is getattr(rnn, "weight_" + m.name.partition(".")[2])  # (gates * hidden, input)
    assert [tuple(m.weight().shape) for m in maps[1:]] == [(24, 5), (24, 5), (21, 5), (3, 5), (3, 5)]


def test_linear_maps_leave_out_what_they_cannot_observe():
    """Grouped, depthwise, reflect-padded, string-padded, 1-D, 3-D and transposed convolutions, and the
    hidden-to-hidden weights and input weights of deeper recurrent layers (their inputs are internal)."""
    names = [m.name for m in linear_maps(ConvAndRecurrent())[0]]
    for left_out in ("grouped", "depthwise", "reflect", "same", "valid", "conv1d", "conv3d", "transposed"):
        assert not [n for n in names if n.startswith(left_out)], left_out
    assert not [n for n in names if "hh" in n or "l1" in n]


def test_linear_maps_select_recurrent_and_conv_maps_by_pattern_and_skip_frozen_weights():
    model = ConvAndRecurrent()
    assert [m.name for m in linear_maps(model, include=["lstm"])[0]] == ["lstm.ih_l0", "lstm.ih_l0_reverse"]
    assert [m.name for m in linear_maps(model, include=["*_reverse"])[0]] == ["lstm.ih_l0_reverse",
                                                                               "rnn.ih_l0_reverse"]
    assert [m.name for m in linear_maps(model, exclude=["lstm", "rnn.*", "conv"])[0]] == ["gru.ih_l0"]
    model.lstm.weight_ih_l0.requires_grad_(False)
    model.conv.requires_grad_(False)
    assert [m.name for m in linear_maps(model)[0]] == ["lstm.ih_l0_reverse", "gru.ih_l0", "rnn.ih_l0",
                                                       "rnn.ih_l0_reverse"]
    with pytest.raises(ValueError, match=r"matches no watchable layer; the candidates are \['lstm.ih_l0_reverse'"):
        linear_maps(model, include=["grouped", "lstm.ih_l1"])
