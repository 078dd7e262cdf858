"""A client's sub-model: a physically small ``nn.Module`` plus what was selected, and its wire form.

The wire payload is a flat ``dict[str, Tensor]``: the module's ``state_dict`` entries, plus

- ``prism::meta``: float64 ``[strategy code, client id, round, keep ratio]``;
- ``prism::index::<layer>``: kept principal components of a factorized layer (int64, ascending);
- ``prism::rows::<module>`` / ``prism::cols::<module>``: kept output / input channels of a module cut
  by a channel baseline;
- ``prism::momentum::<parameter>``: with ``optimizer_state: aggregate``, the SGD momentum buffer of
  each trainable parameter (same shape as the parameter), down and up.

Any transport that can carry tensors can carry a sub-model; :meth:`SubModel.from_payload` rebuilds the
module on the client from the payload and a dense template of the architecture (no full-size
parameters are allocated for the factorized or cut layers).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .config import STRATEGIES
from .layers import PrincipalLayer, principal_like, set_submodule

META = "prism::meta"
INDEX = "prism::index::"
ROWS = "prism::rows::"
COLS = "prism::cols::"
MOMENTUM = "prism::momentum::"
RESERVED = "prism::"


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the ``meta`` device (structure only, no storage)."""
    skeleton = copy.deepcopy(model).to("meta")
    return skeleton


def resized(module: nn.Module, rows: int | None, cols: int | None) -> nn.Module:
    """A meta-device copy of a Conv2d / Linear / BatchNorm with fewer output / input channels."""
    if isinstance(module, nn.Conv2d):
        out_c = rows if rows is not None else module.out_channels
        depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
        in_c = out_c if depthwise else (cols if cols is not None else module.in_channels)
        return nn.Conv2d(
            in_c, out_c, module.kernel_size, module.stride, module.padding, module.dilation,
            groups=out_c if depthwise else 1, bias=module.bias is not None,
            padding_mode=module.padding_mode, device="meta", dtype=module.weight.dtype,
        )
    if isinstance(module, nn.Linear):
        return nn.Linear(
            cols if cols is not None else module.in_features,
            rows if rows is not None else module.out_features,
            bias=module.bias is not None, device="meta", dtype=module.weight.dtype,
        )
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return type(module)(
            rows if rows is not None else module.num_features, eps=module.eps,
            momentum=module.momentum, affine=module.affine,
            track_running_stats=module.track_running_stats, device="meta",
            dtype=module.weight.dtype if module.affine else None,
        )
    raise TypeError(f"cannot resize a {type(module).__name__}")


def build_module(
    skeleton: nn.Module,
    state: Mapping[str, Tensor],
    ranks: Mapping[str, int] | None = None,
    cut: Mapping[str, tuple[int | None, int | None]] | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Materialize a (sub-)model: copy the meta ``skeleton``, put the layers in ``ranks`` in principal
    form with that many components, shrink the modules in ``cut`` to ``(rows, cols)`` channels, then
    load ``state`` (strict: every entry must match)."""
    module = copy.deepcopy(skeleton)
    for name, rank in (ranks or {}).items():
        set_submodule(module, name, principal_like(module.get_submodule(name), rank, "meta"))
    for name, (rows, cols) in (cut or {}).items():
        set_submodule(module, name, resized(module.get_submodule(name), rows, cols))
    module = module.to_empty(device=device)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"payload does not fit the model architecture: {err}") from err
    return module


@dataclass
class SubModel:
    """One client's sub-model for one round.

    ``components[layer]`` are the kept principal components of each factorized layer;
    ``rows[module]`` / ``cols[module]`` the kept channels of each module a channel baseline cuts.
    """

    module: nn.Module
    strategy: str
    client_id: int
    round_idx: int
    keep_ratio: float
    components: dict[str, Tensor] = field(default_factory=dict)
    rows: dict[str, Tensor] = field(default_factory=dict)
    cols: dict[str, Tensor] = field(default_factory=dict)
    momentum: dict[str, Tensor] = field(default_factory=dict)

    def index_entries(self) -> dict[str, Tensor]:
        """The selection as payload entries (``prism::index::…``, ``prism::rows::…``, …)."""
        out: dict[str, Tensor] = {}
        for prefix, table in ((INDEX, self.components), (ROWS, self.rows), (COLS, self.cols)):
            out.update({prefix + name: idx.to(torch.int64) for name, idx in table.items()})
        return out

    def to_payload(self, direction: str = "down") -> dict[str, Tensor]:
        """Flat ``dict[str, Tensor]`` on the CPU. ``down`` (server → client) carries everything;
        ``up`` (client → server) leaves out the frozen σ buffers the server already has."""
        if direction not in ("down", "up"):
            raise ValueError(f"direction={direction!r} is invalid: allowed 'down' or 'up'")
        frozen = {n + ".sigma" for n, m in self.module.named_modules() if isinstance(m, PrincipalLayer)}
        payload: dict[str, Tensor] = OrderedDict()
        for key, value in self.module.state_dict().items():
            if direction == "up" and key in frozen:
                continue
            payload[key] = value.detach().to("cpu")
        payload.update(self.index_entries())
        payload.update({MOMENTUM + k: v.detach().to("cpu") for k, v in self.momentum.items()})
        payload[META] = torch.tensor(
            [STRATEGIES.index(self.strategy), self.client_id, self.round_idx, self.keep_ratio],
            dtype=torch.float64,
        )
        return payload

    @classmethod
    def from_payload(
        cls, payload: Mapping[str, Tensor], template: nn.Module, device: torch.device | str = "cpu"
    ) -> SubModel:
        """Rebuild a sub-model from a ``down`` payload and a dense model of the same architecture
        (its weights are not used; with static BN the template must be converted too)."""
        if META not in payload:
            raise ValueError(f"payload has no {META!r} entry: not a fedml_prism sub-model payload")
        code, client_id, round_idx, keep_ratio = payload[META].tolist()
        components = {k[len(INDEX):]: v for k, v in payload.items() if k.startswith(INDEX)}
        rows = {k[len(ROWS):]: v for k, v in payload.items() if k.startswith(ROWS)}
        cols = {k[len(COLS):]: v for k, v in payload.items() if k.startswith(COLS)}
        momentum = {k[len(MOMENTUM):]: v.to(device) for k, v in payload.items() if k.startswith(MOMENTUM)}
        cut = {
            name: (len(rows[name]) if name in rows else None, len(cols[name]) if name in cols else None)
            for name in set(rows) | set(cols)
        }
        state = {k: v for k, v in payload.items() if not k.startswith(RESERVED)}
        skeleton = template if _on_meta(template) else meta_skeleton(template)
        module = build_module(skeleton, state, {n: len(i) for n, i in components.items()}, cut, device)
        return cls(
            module, STRATEGIES[int(code)], int(client_id), int(round_idx), float(keep_ratio),
            components, rows, cols, momentum,
        )


def _on_meta(model: nn.Module) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    return bool(tensors) and all(t.is_meta for t in tensors)
