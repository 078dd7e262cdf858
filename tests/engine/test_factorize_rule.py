"""The factorization rules (``PrismConfig.rule``), ``nn.MultiheadAttention`` in principal form, the
little-saving warning, and the laws on torchvision architectures."""

from __future__ import annotations

import copy
import logging
import sys
from types import SimpleNamespace

import pytest
import torch
import torchvision.models as tvm
from torch import Tensor, nn

from fedml_prism import PrincipalLinear, PrincipalModel, PrismConfig, convert_static_bn
from fedml_prism.engine.attention import PrismMultiheadAttention, convert_attention, restore_attention
from fedml_prism.engine.costs import submodel_costs
from fedml_prism.engine.decompose import classify_layers, factorizable_layers, little_saving_warning, savings_report
from fedml_prism.engine.submodel import SubModel
from fedml_prism.tools.cli import cmd_costs
from fedml_prism.workloads.models import char_lstm, cnn, lstm_imdb, resnet18_cifar, resnet_tiny, vit_small


class ShortcutNet(nn.Module):
    """stem 3×3 → block (3×3 stride 2, pointwise 1×1) with a 1×1 conv shortcut named ``proj`` (so only
    tracing, not the name, can tell it is a shortcut) → classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.a = nn.Conv2d(32, 64, 3, 2, 1)
        self.bn = nn.BatchNorm2d(64)
        self.b = nn.Conv2d(64, 64, 1)
        self.proj = nn.Sequential(nn.Conv2d(32, 64, 1, 2), nn.BatchNorm2d(64))
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x).relu()
        y = self.b(self.bn(self.a(x)).relu())
        return self.head((y + self.proj(x)).relu().mean((2, 3)))


BASE = {"default": {"a", "b"}, "paper": {"a"}}


@pytest.mark.parametrize(
    ("rule", "flag", "keep", "added"),
    [
        ("default", "skip_first_conv", 0.2, {"stem"}),
        ("paper", "skip_first_conv", 0.2, {"stem"}),
        ("default", "skip_1x1", 0.2, {"proj.0"}),  # the shortcut only: the pointwise "b" is already in
        ("paper", "skip_1x1", 0.2, {"b", "proj.0"}),  # every 1×1 conv
        ("default", "skip_classifier", 0.2, {"head"}),
        ("paper", "skip_classifier", 0.2, {"head"}),
        ("default", "skip_no_saving", 1.0, {"a", "b"}),  # at keep 1 no principal form is smaller
        ("paper", "skip_no_saving", 1.0, {"a"}),
    ],
)
def test_each_skip_flag_switches_its_part_of_the_rule(rule: str, flag: str, keep: float, added: set[str]) -> None:
    model = ShortcutNet()
    on = set(factorizable_layers(model, PrismConfig(rule=rule, keep_ratio=keep)))
    off = set(factorizable_layers(model, PrismConfig(rule=rule, keep_ratio=keep, **{flag: False})))
    assert on == (BASE[rule] if keep < 1 else set())
    assert off - on == added and on <= off


def test_reasons_name_the_part_of_the_rule() -> None:
    reasons = classify_layers(ShortcutNet(), PrismConfig())
    assert reasons["a"] is None and reasons["b"] is None
    assert "first layer on raw input" in reasons["stem"]
    assert "shortcut" in reasons["proj.0"]
    assert "classifier" in reasons["head"]
    assert "1×1 conv" in classify_layers(ShortcutNet(), PrismConfig(rule="paper"))["b"]


class Untraceable(ShortcutNet):
    """The same layers, a forward torch.fx cannot trace (data-dependent branch), the shortcut named
    ``downsample``: the rule falls back to names and registration order."""

    def __init__(self) -> None:
        super().__init__()
        self.downsample = self.proj
        del self.proj

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x).relu()
        if x.sum() > 0:
            x = x * 1.0
        y = self.b(self.bn(self.a(x)).relu())
        return self.head((y + self.downsample(x)).relu().mean((2, 3)))


def test_untraceable_model_falls_back_to_names_and_order() -> None:
    reasons = classify_layers(Untraceable(), PrismConfig())
    assert "first layer" in reasons["stem"] and "shortcut" in reasons["downsample.0"]
    assert reasons["a"] is None and reasons["b"] is None


def test_parallel_single_layer_branches_are_not_shortcuts() -> None:
    class Parallel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 3)
            self.left = nn.Conv2d(32, 32, 3, padding=1)
            self.right = nn.Conv2d(32, 32, 1)
            self.head = nn.Linear(32, 4)

        def forward(self, x: Tensor) -> Tensor:
            x = self.stem(x)
            return self.head((self.left(x) + self.right(x)).mean((2, 3)))

    assert factorizable_layers(Parallel(), PrismConfig()) == ["left", "right"]


@pytest.mark.parametrize(
    ("factory", "shortcuts"),
    [
        (lambda: tvm.resnet18(num_classes=10), {"layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"}),
        (lambda: tvm.regnet_x_400mf(num_classes=10), {f"trunk_output.block{i}.block{i}-0.proj.0" for i in range(1, 5)}),
        (lambda: tvm.mobilenet_v2(num_classes=10, width_mult=0.25), set()),  # identity shortcuts only
    ],
)
def test_torchvision_shortcuts_are_found_by_tracing(factory, shortcuts: set[str]) -> None:
    reasons = classify_layers(factory(), PrismConfig())
    assert {n for n, r in reasons.items() if r and "shortcut" in r} == shortcuts


@pytest.mark.parametrize(
    "factory",
    [
        cnn,
        lambda: cnn(in_channels=1, image_size=8, width=0.5, hidden=64),
        lambda: cnn(in_channels=3, image_size=32, width=0.5, hidden=160),
        resnet18_cifar,
        resnet_tiny,
        vit_small,
        lambda: lstm_imdb(vocab_size=50, hidden=16),
        lambda: char_lstm(hidden=16),
    ],
)
def test_builtin_models_factorize_the_same_layers_under_both_rules(factory) -> None:
    model = factory()
    default = factorizable_layers(model, PrismConfig())
    assert default and default == factorizable_layers(model, PrismConfig(rule="paper"))


class ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward: replacing it by a principal layer would change it."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x)


def test_linear_subclasses_with_linears_forward_are_factorized_by_default_only() -> None:
    model = nn.Sequential(
        nn.Linear(16, 64), nn.modules.linear.NonDynamicallyQuantizableLinear(64, 64), ScaledLinear(64, 64),
        nn.Linear(64, 4),
    )
    assert factorizable_layers(model, PrismConfig()) == ["1"]
    assert factorizable_layers(model, PrismConfig(rule="paper")) == ["0"]  # its first-layer part is about convs
    assert "ScaledLinear" in savings_report(model, PrismConfig()).format()


def test_rule_is_validated_and_round_trips() -> None:
    with pytest.raises(ValueError, match=r"^PrismConfig.rule='mine' is invalid: allowed one of default, paper$"):
        PrismConfig(rule="mine")
    cfg = PrismConfig(rule="paper", skip_1x1=False)
    assert cfg.to_dict()["rule"] == "paper" and PrismConfig.from_mapping(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------- nn.MultiheadAttention
def _random_mha(**kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, **kwargs).eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_(0, 0.5)
    return mha


N, L, S = 3, 4, 6
_PAD = torch.zeros(N, S, dtype=torch.bool)
_PAD[0, -2:] = True


def _inputs(batch_first: bool, kdim: int, self_attention: bool) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)

    def seq(length: int, dim: int) -> Tensor:
        return torch.randn(N, length, dim, generator=g) if batch_first else torch.randn(length, N, dim, generator=g)

    q = seq(S if self_attention else L, 8)
    if self_attention:
        return q, q, q
    return q, seq(S, kdim), seq(S, kdim)


@pytest.mark.parametrize(
    ("init", "self_attention", "call"),
    [
        ({"batch_first": True}, True, {"need_weights": False}),
        ({"batch_first": True}, True, {}),
        ({"batch_first": False}, True, {"need_weights": True, "average_attn_weights": False}),
        ({"batch_first": True}, True, {"need_weights": False, "key_padding_mask": _PAD}),
        ({"batch_first": True}, True, {"need_weights": False, "is_causal": True,
                                       "attn_mask": nn.Transformer.generate_square_subsequent_mask(S)}),
        ({"batch_first": False}, False, {"need_weights": False, "key_padding_mask": _PAD,
                                         "attn_mask": torch.triu(torch.ones(L, S, dtype=torch.bool), 3)}),
        ({"batch_first": True}, False, {"attn_mask": torch.randn(N * 2, L, S), "key_padding_mask": _PAD.float() * -2}),
        ({"batch_first": True, "kdim": 5, "vdim": 5}, False, {"key_padding_mask": _PAD}),
        ({"add_bias_kv": True, "add_zero_attn": True}, False, {"need_weights": False, "key_padding_mask": _PAD}),
        ({"bias": False}, True, {}),
    ],
)
def test_converted_attention_equals_torch(init: dict, self_attention: bool, call: dict) -> None:
    mha = _random_mha(**init)
    converted = convert_attention(copy.deepcopy(mha))
    assert isinstance(converted, PrismMultiheadAttention)
    q, k, v = _inputs(init.get("batch_first", False), init.get("kdim", 8), self_attention)
    with torch.no_grad():
        out, weights = mha(q, k, v, **call)
        got, got_weights = converted(q, k, v, **call)
        single, _ = mha(q[0] if init.get("batch_first") else q[:, 0], k[0] if init.get("batch_first") else k[:, 0],
                        v[0] if init.get("batch_first") else v[:, 0])
        got_single, _ = converted(q[0] if init.get("batch_first") else q[:, 0],
                                  k[0] if init.get("batch_first") else k[:, 0], v[0] if init.get("batch_first") else v[:, 0])
    assert got.shape == out.shape and (got - out).abs().max() <= 1e-5
    assert (weights is None) == (got_weights is None)
    if weights is not None:
        assert got_weights.shape == weights.shape and (got_weights - weights).abs().max() <= 1e-5
    assert (got_single - single).abs().max() <= 1e-5  # unbatched input
    restored = restore_attention(converted)
    assert set(restored.state_dict()) == set(mha.state_dict())
    assert all(torch.equal(restored.state_dict()[key], value) for key, value in mha.state_dict().items())


def test_attention_errors_are_clear() -> None:
    converted = convert_attention(_random_mha(batch_first=True))
    x = torch.randn(2, 5, 8)
    with pytest.raises(RuntimeError, match="is_causal=True needs attn_mask"):
        converted(x, x, x, is_causal=True)
    with pytest.raises(RuntimeError, match=r"attn_mask of shape \(3, 3\) is invalid: allowed \(5, 5\)"):
        converted(x, x, x, attn_mask=torch.zeros(3, 3))
    with pytest.raises(TypeError, match="key_padding_mask of dtype torch.int64 is invalid"):
        converted(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="embed_dim=8, num_heads=3 is invalid"):
        PrismMultiheadAttention(8, 3)


def _transformer() -> nn.Module:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(6, 32)
            layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2)
            self.head = nn.Linear(32, 3)

        def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
            return self.head(self.encoder(self.embed(x), src_key_padding_mask=padding)[:, 0])

    torch.manual_seed(0)
    return Encoder().eval()


def test_transformer_encoder_in_principal_form_reproduces_dense_output() -> None:
    """PyTorch's TransformerEncoder takes a fused inference path that reads the raw weights; with
    converted attention it runs the modules, so factorized ``linear1`` / ``in_proj`` work in eval."""
    model = _transformer()
    x = torch.randn(4, 5, 6)
    padding = torch.zeros(4, 5, dtype=torch.bool)
    padding[1, 3:] = True
    pm = PrincipalModel(model, PrismConfig(keep_ratio=1.0, skip_no_saving=False))
    assert {"encoder.layers.0.self_attn.in_proj", "encoder.layers.0.self_attn.out_proj",
            "encoder.layers.1.linear1"} <= set(pm.layers)
    sub = pm.sample_submodel(0, 0, record=False).module.eval()
    with torch.no_grad():
        reference = model(x, padding)
        assert (sub(x, padding) - reference).abs().max() <= 1e-4
        assert (sub(x) - model(x)).abs().max() <= 1e-4


def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                                 num_classes=10)


def test_torchvision_vit_attention_is_factorized_for_real() -> None:
    model = _tiny_vit()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    full = PrincipalModel(model, PrismConfig(keep_ratio=1.0, skip_no_saving=False))
    projections = {f"encoder.layers.encoder_layer_{i}.self_attention.{p}" for i in range(2) for p in ("in_proj", "out_proj")}
    assert projections <= set(full.layers)
    sub = full.sample_submodel(0, 0, record=False).module.eval()
    with torch.no_grad():
        assert (sub(x) - model.eval()(x)).abs().max() <= 1e-4  # keep 1 equals the dense nn.MultiheadAttention model

    pm = PrincipalModel(model, PrismConfig(keep_ratio=0.2))
    assert projections <= set(pm.layers)
    small = pm.sample_submodel(0, 0)
    for name in projections:
        layer = small.module.get_submodule(name)
        assert isinstance(layer, PrincipalLinear) and layer.rank == 7  # ceil(0.2 · 32)
    report = submodel_costs(pm, small, x[:1])
    assert report.params < report.dense_params and report.macs < report.dense_macs
    assert report.dense_params == sum(p.numel() for p in model.parameters())
    # a client rebuilds the sub-model from the payload and its own template (PrismClient converts it too)
    rebuilt = SubModel.from_payload(small.to_payload("down"), convert_attention(copy.deepcopy(model)))
    with torch.no_grad():
        assert torch.equal(rebuilt.module.eval()(x), small.module.eval()(x))
    # the dense model goes back to PyTorch's attention and state dict keys
    restored = restore_attention(pm.dense_model())
    assert set(restored.state_dict()) == set(model.state_dict())


# ---------------------------------------------------------------------------- laws on torchvision models
ARCHITECTURES = {
    "resnet10": lambda: tvm.resnet.ResNet(tvm.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10),
    "mobilenet_v2": lambda: tvm.mobilenet_v2(num_classes=10, width_mult=0.25),
    "shufflenet_v2_x0_5": lambda: tvm.shufflenet_v2_x0_5(num_classes=10),
    "vit_tiny": _tiny_vit,
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_torchvision_laws(name: str) -> None:
    torch.manual_seed(0)
    model = ARCHITECTURES[name]()
    size = 32 if name == "vit_tiny" else 48  # static BN on 1×1 maps of a few samples amplifies rounding
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))
    full = PrincipalModel(model, PrismConfig(keep_ratio=1.0, skip_no_saving=False))
    reference = convert_static_bn(copy.deepcopy(model)).eval()
    with torch.no_grad():
        expected = reference(x)
        got = full.sample_submodel(0, 0, record=False).module.eval()(x)
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())

    pm = PrincipalModel(model, PrismConfig(keep_ratio=0.2))
    report = submodel_costs(pm, pm.sample_submodel(0, 0, record=False), x[:2])
    assert report.params < report.dense_params and report.macs < report.dense_macs
    assert report.params == savings_report(model, pm.config).params  # the analytic count is the real one
    if name != "vit_tiny":  # conv nets: 1×1 convs are factorized, so most parameters go
        assert report.ratios["params"] < 0.5
    if name in ("mobilenet_v2", "shufflenet_v2_x0_5"):  # all 1×1 or depthwise: the paper rule saves nothing
        assert savings_report(model, PrismConfig(rule="paper")).share == 1.0


# ---------------------------------------------------------------------------- the warning
class DepthwiseNet(nn.Module):
    """Mostly depthwise 7×7 convs (which stay dense), one pointwise conv, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3)
        self.dw = nn.Sequential(*[nn.Conv2d(64, 64, 7, padding=3, groups=64) for _ in range(4)])
        self.pw = nn.Conv2d(64, 64, 1)
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pw(self.dw(self.stem(x))).mean((2, 3)))


def test_warning_names_the_layers_that_stay_dense() -> None:
    warning = little_saving_warning(DepthwiseNet(), PrismConfig(keep_ratio=0.2))
    assert warning is not None and "keep 0.2 holds" in warning
    for i in range(4):
        assert f"dw.{i} (Conv2d, 3,200 params" in warning
    assert "depthwise conv (groups=64)" in warning and "stem" in warning and "first layer on raw input" in warning
    assert little_saving_warning(DepthwiseNet(), PrismConfig(keep_ratio=0.4)) is None  # keep > 0.3
    assert little_saving_warning(DepthwiseNet(), PrismConfig(strategy="full")) is None


@pytest.mark.parametrize(
    "kwargs", [{"in_channels": 1, "image_size": 8, "width": 0.5, "hidden": 64}, {"in_channels": 3, "image_size": 32,
                                                                                 "width": 0.5, "hidden": 160}]
)
def test_no_warning_for_the_paper_cnn(kwargs: dict) -> None:
    """The paper CNN as the default job and the CIFAR bench profile build it."""
    assert little_saving_warning(cnn(**kwargs), PrismConfig(keep_ratio=0.2)) is None


def test_warning_under_the_paper_rule_on_mobilenet() -> None:
    warning = little_saving_warning(tvm.mobilenet_v2(num_classes=10, width_mult=0.25), PrismConfig(rule="paper"))
    assert warning is not None and "1×1 conv (skip_1x1, rule paper)" in warning and "rule: default also" in warning
    assert little_saving_warning(tvm.mobilenet_v2(num_classes=10, width_mult=0.25), PrismConfig()) is None


def test_costs_command_prints_the_warning(capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tiny_depthwise", SimpleNamespace(net=DepthwiseNet))
    args = SimpleNamespace(model="tiny_depthwise:net", model_arg=[], input_shape=(3, 12, 12), input_dtype="auto",
                           strategy="prism", keep_ratio=0.2, seed=0, json=True, layers=False, batch_size=4,
                           activation_memory="principal")
    assert cmd_costs(args) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: strategy prism with rule default") and "dw.3 (Conv2d" in err
    monkeypatch.setitem(sys.modules, "tiny_cnn", SimpleNamespace(net=lambda: cnn(in_channels=3, image_size=32, width=0.5,
                                                                                 hidden=160)))
    assert cmd_costs(SimpleNamespace(**{**vars(args), "model": "tiny_cnn:net", "input_shape": (3, 32, 32)})) == 0
    assert "warning" not in capsys.readouterr().err


def test_run_logs_the_warning(tmp_path, monkeypatch) -> None:
    from fedml_prism.tools.run import main

    monkeypatch.setitem(sys.modules, "tiny_depthwise", SimpleNamespace(net=DepthwiseNet))
    config = tmp_path / "fedml_config.yaml"
    config.write_text(
        "common_args: {training_type: simulation}\n"
        "model_args: {model: 'tiny_depthwise:net'}\n"
        "train_args: {backend: sp, client_num_in_total: 2, client_num_per_round: 2, comm_round: 1}\n"
        "prism_args: {keep_ratio: 0.2}\n"
    )
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("fedml_prism")
    logger.addHandler(handler)
    try:
        assert main(SimpleNamespace(cf=str(config), output_dir=str(tmp_path / "out"), check=True, role="server")) == 0
    finally:
        logger.removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any("depthwise conv (groups=64)" in w and "dw.0" in w for w in warnings)
