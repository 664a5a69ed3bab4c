"""Conv channel surgery in the core: coupled channel groups of stages (conv necks, conv projectors).

A conv that is not on a residual edge cannot be removed, only narrowed: its out-channels are the next
norm's features and the next layer's in-channels, and all of them shrink together. Each surgery here is
checked against a reference computed without prunekit's surgery: zeroed member slices where nothing
between the two layers mixes channels (a per-channel norm in eval mode, a depthwise conv), and an
independently written narrower forward where a LayerNorm over the channels sits between them (removing a
channel changes its mean and variance, so zeroing is not the same).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit_core.adapters.base import ArchitectureAdapter, count_params
from prunekit_core.adapters.groups import conv_channels
from prunekit_core.ir.errors import PlanError
from prunekit_core.ir.model import Dim, ModelIR, Stage, Tower
from prunekit_core.surgery.apply import resolve_removals
from prunekit_core.surgery.width import apply_width, group_slices, resolve_width, width_is_uniform


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (as GOT-OCR2's and ConvNeXt's necks use)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNet(nn.Module):
    """stem conv -> BatchNorm -> depthwise conv -> conv -> channel LayerNorm -> strided conv -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(width=6)
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.conv = nn.Conv2d(6, 5, 1, bias=False)
        self.norm = ChannelNorm(5)
        self.down = nn.Conv2d(5, 12, 3, stride=2, padding=1)
        self.proj = nn.Linear(12, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(self.bn(self.stem(x)))
        x = self.down(self.norm(self.conv(x)))
        return self.proj(x.flatten(2).transpose(1, 2))


def make_net() -> ConvNet:
    torch.manual_seed(0)
    net = ConvNet().eval()
    with torch.no_grad():  # non-trivial norm statistics and affine parameters
        for p in net.parameters():
            p.normal_(0, 0.5)
        net.bn.running_mean.normal_(0, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


class ConvAdapter(ArchitectureAdapter):
    name = "toy-conv"

    def match(self, model: nn.Module) -> float | None:
        return None

    def build_ir(self, model: nn.Module) -> ModelIR:
        fams = (
            conv_channels(
                "vision.stem.channels",
                model,
                "stem",
                ["conv"],
                norms=["bn"],
                depthwise=["dw"],
                config_fields={"width": 1},
                config="",
            ),
            conv_channels("vision.conv.channels", model, "conv", ["down"], norms=["norm"], in_config=False),
            conv_channels(  # down has 2 * width channels
                "vision.down.channels",
                model,
                "down",
                ["proj"],
                config_fields={"width": 1},
                config="",
                config_divisor=2,
            ),
        )
        stage = Stage(
            id="vision.convs", kind="neck", module="", params=count_params([model]), channel_groups=fams
        )
        tower = Tower(
            name="vision", width=Dim(name="channels", size=6), blocks_path="", blocks=(), stages=(stage,)
        )
        return ModelIR(
            architecture="ConvNet",
            model_type="toy",
            adapter=self.name,
            towers=(tower,),
            total_params=count_params([model]),
        )

    def finalize_surgery(
        self, model: nn.Module, ir_before: ModelIR, kept_blocks: dict[str, list[int]]
    ) -> None:
        return None


def narrow(groups: dict[str, list[int]]) -> tuple[ConvNet, ModelIR]:
    net = make_net()
    adapter = ConvAdapter()
    ir = adapter.build_ir(net)
    apply_width(net, adapter, ir, resolve_width(ir, groups))
    return net, ir


def image(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_channels_without_normalisation_between_equal_zeroed_contribution() -> None:
    """stem -> BatchNorm (eval: per channel) -> depthwise -> conv, and down -> linear: removing channels
    equals zeroing every coupled slice of them, so the removed channels contribute nothing."""
    groups = {"vision.stem.channels": [0, 4], "vision.down.channels": [1, 2, 11]}
    reference = make_net()
    ir = ConvAdapter().build_ir(reference)
    fams = ir.stage_channel_groups()
    for fid, removed in groups.items():
        for member, tensor in group_slices(reference, fams[fid][1]):
            for g in removed:
                tensor.narrow(member.axis, g, 1).zero_()
    narrowed, _ = narrow(groups)
    x = image()
    torch.testing.assert_close(narrowed(x), reference(x), atol=1e-6, rtol=0)
    assert not torch.allclose(narrowed(x), make_net()(x), atol=1e-3), "the cut changed nothing"


@torch.no_grad()
def test_channels_through_a_channel_layernorm_equal_a_narrower_forward() -> None:
    """conv -> channel LayerNorm -> down: the norm's statistics change with the channels, so the reference
    is the same network written out by hand at the narrower width."""
    removed = [1, 3]
    narrowed, _ = narrow({"vision.conv.channels": removed})
    narrowed, full = narrowed.double(), make_net().double()  # float64: the two orders of summation agree
    keep = [c for c in range(5) if c not in removed]
    x = image().double()
    h = full.dw(full.bn(full.stem(x)))
    h = F.conv2d(h, full.conv.weight[keep])
    h = h.permute(0, 2, 3, 1)
    mean = h.mean(-1, keepdim=True)
    var = h.var(-1, unbiased=False, keepdim=True)
    h = (
        (h - mean) / torch.sqrt(var + full.norm.eps) * full.norm.weight[keep] + full.norm.bias[keep]
    ).permute(0, 3, 1, 2)
    h = F.conv2d(h, full.down.weight[:, keep], full.down.bias, stride=2, padding=1)
    want = full.proj(h.flatten(2).transpose(1, 2))
    torch.testing.assert_close(narrowed(x), want, atol=1e-12, rtol=0)
    zeroed = make_net().double()  # zeroing instead is measurably different: the statistics moved
    zeroed.conv.weight[removed] = 0
    assert not torch.allclose(zeroed(x), want, atol=1e-4)


def test_module_attributes_follow_the_new_shapes() -> None:
    net, _ = narrow(
        {"vision.stem.channels": [0], "vision.conv.channels": [4], "vision.down.channels": [0, 1]}
    )
    assert (net.stem.out_channels, net.bn.num_features, net.bn.running_mean.shape[0]) == (5, 5, 5)
    assert (net.dw.in_channels, net.dw.out_channels, net.dw.groups) == (5, 5, 5)
    assert (net.conv.in_channels, net.conv.out_channels, net.norm.normalized_shape) == (5, 4, (4,))
    assert (net.down.in_channels, net.down.out_channels, net.proj.in_features) == (4, 10, 10)
    assert net(image()).shape == (2, 16, 7)


def test_batchnorm_running_statistics_are_cut_with_the_channels() -> None:
    """BatchNorm's running statistics are buffers: they are members (sliced) but count no parameters."""
    net = make_net()
    fam = ConvAdapter().build_ir(net).stage_channel_groups()["vision.stem.channels"][1]
    assert {m.param for m in fam.members} >= {"bn.running_mean", "bn.running_var"}
    # per channel: stem 3*3*3 + bias, bn weight + bias, depthwise 3*3 + bias, conv's input column of 5
    assert fam.params_per_group == 28 + 2 + 10 + 5
    net, _ = narrow({"vision.stem.channels": [0]})
    assert net.bn.running_mean.shape == (5,) and not isinstance(net.bn.running_var, nn.Parameter)
    assert "bn.running_var" in dict(net.named_buffers())


def test_config_fields_divisor_and_undescribed_families() -> None:
    net = make_net()
    ir = ConvAdapter().build_ir(net)
    # width = stem channels = down channels / 2
    assert not width_is_uniform(
        ir, resolve_width(ir, {"vision.stem.channels": [0], "vision.down.channels": [0]})
    )
    assert width_is_uniform(
        ir, resolve_width(ir, {"vision.stem.channels": [0], "vision.down.channels": [0, 1]})
    )
    assert not width_is_uniform(ir, resolve_width(ir, {"vision.stem.channels": [0]}))
    # a family no config field counts: any cut needs load_pruned
    assert not width_is_uniform(ir, resolve_width(ir, {"vision.conv.channels": [0]}))


def test_dimension_mismatch_is_named() -> None:
    net = make_net()
    with pytest.raises(PlanError, match="down has 5 input channels, but stem produces 6"):
        conv_channels("f", net, "stem", ["down"])
    with pytest.raises(PlanError, match="not a depthwise conv"):
        conv_channels("f", net, "conv", ["down"], depthwise=["norm"])


def test_removing_a_stage_or_all_its_channels_is_refused() -> None:
    ir = ConvAdapter().build_ir(make_net())
    for unit in ("vision.convs", "vision.conv", "vision.down"):
        with pytest.raises(PlanError, match="not a branch on a residual edge.*Narrow it instead"):
            resolve_removals(ir, [unit])
    with pytest.raises(PlanError, match="vision.down.channels"):
        resolve_removals(ir, ["vision.down"])
    with pytest.raises(PlanError, match="cannot be removed.*keep at least one channel"):
        resolve_width(ir, {"vision.conv.channels": list(range(5))})


def test_config_fields_are_set_from_the_cut() -> None:
    net = make_net()
    adapter = ConvAdapter()
    ir = adapter.build_ir(net)
    cuts = resolve_width(ir, {"vision.stem.channels": [0], "vision.down.channels": [0, 1]})
    assert apply_width(net, adapter, ir, cuts) and net.config.width == 5
    net = make_net()
    cuts = resolve_width(ir, {"vision.down.channels": [0]})  # 11 channels: no width describes them
    assert not apply_width(net, adapter, ir, cuts) and net.config.width == 6
