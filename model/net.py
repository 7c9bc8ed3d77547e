"""The approval model: one row per (attempt, candidate route) in, probabilities out.

Output column 0 is P(approve) of this attempt on this route; column ``1 + b`` is P(approve) if the
declined payment is retried on this route after ``DELAY_BUCKETS_S[b]`` seconds. A shared trunk feeds
a route head and a retry head, so the retry estimates share what the trunk learned about the route and
the issuer. Inputs are normalized inside the module (mean/std buffers) so that the exported artifact
takes raw `model.layout` rows and the server never needs a separate preprocessing step.

Optionally, the one-hot groups of the layout (network, funding, ...) are replaced by small learned
embeddings, and a per-column Platt calibration (``sigmoid(logit * scale + bias)``) fitted after
training is applied by `forward`, so the exported artifact serves calibrated probabilities.
"""

from collections.abc import Sequence
from typing import Final

import torch
from torch import nn

__all__ = [
    "CATEGORICAL_FIELDS",
    "ApprovalNet",
    "EnsembleNet",
    "FusedEnsembleNet",
    "layout_categorical_groups",
]

_MIN_STD = 1e-6

# Last name component of the layout's one-hot fields: `attempt.network.visa` is category `visa` of
# field `attempt.network`. `attempt.network_token` is a plain input (its field would be `attempt`).
CATEGORICAL_FIELDS: tuple[str, ...] = (
    "network",
    "funding",
    "channel",
    "initiator",
    "last_decline",
    "last_decline_class",
)


def layout_categorical_groups(layout: Sequence[str]) -> list[list[int]]:
    """The one-hot groups of `layout`: per categorical field, its ``<field>.<category>`` input indices.

    Groups are in order of first appearance, indices ascending. Use it as
    ``ApprovalNet(..., categorical_groups=layout_categorical_groups(INPUT_LAYOUT))``.
    """
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(layout):
        field, dot, category = name.rpartition(".")
        if dot and category and field.rpartition(".")[2] in CATEGORICAL_FIELDS:
            groups.setdefault(field, []).append(i)
    return list(groups.values())


def _check_groups(groups: Sequence[Sequence[int]], n_inputs: int) -> list[list[int]]:
    out = [[int(i) for i in g] for g in groups]
    seen: set[int] = set()
    for g in out:
        if not g:
            raise ValueError("categorical group must name at least one input column")
        for i in g:
            if not 0 <= i < n_inputs:
                raise ValueError(f"categorical group column {i} is outside [0, {n_inputs})")
            if i in seen:
                raise ValueError(f"input column {i} appears in more than one categorical group (or twice)")
            seen.add(i)
    return out


def _slots(
    x: torch.Tensor,
    group_cols: torch.Tensor,
    group_valid: torch.Tensor,
    group_sizes: torch.Tensor,
    group_offsets: torch.Tensor,
    n_groups: int,
    max_group: int,
    n_slots: int,
) -> torch.Tensor:
    """The categorical groups of `x` as one-hot slots ``[N, n_slots]``: per group its hot column,
    or its "none" slot when no column is hot (see `ApprovalNet`)."""
    n = x.size(0)
    hot = x.index_select(1, group_cols).reshape(n, n_groups, max_group)
    present = (hot != 0) & group_valid
    idx = torch.argmax(hot.masked_fill(~group_valid, float("-inf")), dim=2)
    idx = torch.where(present.any(dim=2), idx, group_sizes)
    slots = torch.zeros(n, n_slots, dtype=x.dtype, device=x.device)
    return slots.scatter_(1, idx + group_offsets, 1.0)


def _set_calibration(
    net: "ApprovalNet | EnsembleNet",
    scale: torch.Tensor | Sequence[float],
    bias: torch.Tensor | Sequence[float],
) -> None:
    a = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    b = torch.as_tensor(bias, dtype=torch.float32).reshape(-1)
    n = 1 + net.n_buckets
    if a.numel() != n or b.numel() != n:
        raise ValueError(
            f"calibration needs {n} values (1 + n_buckets), got scale {a.numel()} and bias {b.numel()}"
        )
    if not bool(torch.isfinite(a).all()) or not bool(torch.isfinite(b).all()):
        raise ValueError("calibration scale/bias must be finite")
    with torch.no_grad():
        net.cal_scale.copy_(a)
        net.cal_bias.copy_(b)


class ApprovalNet(nn.Module):
    """A small MLP: float32 ``[N, n_inputs]`` → probabilities float32 ``[N, 1 + n_buckets]``.

    TorchScript-scriptable; `logits` is the pre-sigmoid, uncalibrated output for training with
    ``BCEWithLogitsLoss`` (numerically stable), `forward` is what gets exported and served
    (calibrated: ``sigmoid(logits * cal_scale + cal_bias)`` per column).

    `categorical_groups` lists, per one-hot field, its input columns. Each field becomes an index
    (the hot column, or "none" when all of its columns are 0) looked up in an embedding of
    `embed_dim` values; the trunk sees the normalized other columns followed by the embeddings.
    """

    n_inputs: Final[int]
    n_buckets: Final[int]
    n_groups: Final[int]
    max_group: Final[int]
    n_slots: Final[int]
    mean: torch.Tensor
    std: torch.Tensor
    cal_scale: torch.Tensor
    cal_bias: torch.Tensor
    numeric_cols: torch.Tensor
    group_cols: torch.Tensor
    group_valid: torch.Tensor
    group_sizes: torch.Tensor
    group_offsets: torch.Tensor
    group_block: torch.Tensor

    def __init__(
        self,
        n_inputs: int,
        n_buckets: int,
        hidden: int = 64,
        *,
        categorical_groups: Sequence[Sequence[int]] = (),
        embed_dim: int = 4,
    ) -> None:
        super().__init__()
        if n_inputs < 1 or n_buckets < 0 or hidden < 1 or embed_dim < 1:
            raise ValueError(
                f"bad ApprovalNet shape: n_inputs={n_inputs} n_buckets={n_buckets} hidden={hidden} "
                f"embed_dim={embed_dim}"
            )
        groups = _check_groups(categorical_groups, n_inputs)
        grouped = {i for g in groups for i in g}
        numeric = [i for i in range(n_inputs) if i not in grouped]
        self.n_inputs = n_inputs
        self.n_buckets = n_buckets
        self.n_groups = len(groups)
        self.max_group = max((len(g) for g in groups), default=0)
        self.register_buffer("mean", torch.zeros(n_inputs, dtype=torch.float32))
        self.register_buffer("std", torch.ones(n_inputs, dtype=torch.float32))
        self.register_buffer("cal_scale", torch.ones(1 + n_buckets, dtype=torch.float32))
        self.register_buffer("cal_bias", torch.zeros(1 + n_buckets, dtype=torch.float32))
        # Groups as one padded [G, max_group] gather: padding points at column 0 and is masked out.
        cols = torch.zeros(self.n_groups, self.max_group, dtype=torch.int64)
        valid = torch.zeros(self.n_groups, self.max_group, dtype=torch.bool)
        for k, g in enumerate(groups):
            cols[k, : len(g)] = torch.tensor(g, dtype=torch.int64)
            valid[k, : len(g)] = True
        sizes = [len(g) for g in groups]
        offsets = [sum(n + 1 for n in sizes[:k]) for k in range(len(sizes))]
        self.n_slots = sum(n + 1 for n in sizes)
        # [n_slots, G * embed_dim]: slot rows of group k feed only embedding k's output columns.
        block = torch.zeros(self.n_slots, self.n_groups, embed_dim, dtype=torch.float32)
        for k, n in enumerate(sizes):
            block[offsets[k] : offsets[k] + n + 1, k, :] = 1.0
        self.register_buffer("numeric_cols", torch.tensor(numeric, dtype=torch.int64))
        self.register_buffer("group_cols", cols.reshape(-1))
        self.register_buffer("group_valid", valid)
        self.register_buffer("group_sizes", torch.tensor(sizes, dtype=torch.int64))
        self.register_buffer("group_offsets", torch.tensor(offsets, dtype=torch.int64))
        self.register_buffer("group_block", block.reshape(self.n_slots, self.n_groups * embed_dim))
        trunk_in = len(numeric) + self.n_groups * embed_dim
        self.trunk = nn.Sequential(
            nn.Linear(trunk_in, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.route_head = nn.Linear(hidden, 1)
        self.retry_head = nn.Linear(hidden, n_buckets)
        # Created last so that a net without groups initializes exactly as before embeddings existed.
        self.embedding: nn.Embedding | None = nn.Embedding(self.n_slots, embed_dim) if groups else None

    @torch.jit.unused
    def set_normalization(
        self, mean: torch.Tensor | Sequence[float], std: torch.Tensor | Sequence[float]
    ) -> None:
        """Set the per-input mean and std (e.g. from the training split).

        A (near-)zero std — a constant feature — is replaced by 1 so it is only centred.
        Columns of categorical groups are not normalized (their raw 0/1 values pick the embedding).
        """
        m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        s = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if m.numel() != self.n_inputs or s.numel() != self.n_inputs:
            raise ValueError(
                f"normalization needs {self.n_inputs} values, got mean {m.numel()} and std {s.numel()}"
            )
        if not bool(torch.isfinite(m).all()) or not bool(torch.isfinite(s).all()):
            raise ValueError("normalization mean/std must be finite")
        s = torch.where(s.abs() < _MIN_STD, torch.ones_like(s), s.abs())
        with torch.no_grad():
            self.mean.copy_(m)
            self.std.copy_(s)

    @torch.jit.unused
    def set_calibration(
        self, scale: torch.Tensor | Sequence[float], bias: torch.Tensor | Sequence[float]
    ) -> None:
        """Set the per-output-column Platt calibration: ``p = sigmoid(logit * scale + bias)``."""
        _set_calibration(self, scale, bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid, uncalibrated outputs ``[N, 1 + n_buckets]``."""
        if x.dim() != 2 or x.size(1) != self.n_inputs:
            raise ValueError(
                "ApprovalNet expects input [N, " + str(self.n_inputs) + "], got " + str(list(x.shape))
            )
        z, slots = self.inputs(x)
        return self.logits_from(z, slots)

    def inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The standardized numeric inputs and the categorical slots' one-hot (no learned weights:
        nets with the same normalization and groups compute the same, so an ensemble does it once)."""
        # Standardized inputs are bounded: a value far outside anything seen in training (an
        # incident's error rate, a corrupt feature) must not extrapolate the net without limit.
        z = ((x - self.mean) / self.std).clamp(-6.0, 6.0)
        slots = torch.zeros(0, 0, dtype=x.dtype, device=x.device)
        if self.embedding is not None:
            slots = _slots(
                x, self.group_cols, self.group_valid, self.group_sizes, self.group_offsets,
                self.n_groups, self.max_group, self.n_slots,
            )  # fmt: skip
            z = z.index_select(1, self.numeric_cols)
        return z, slots

    def logits_from(self, z: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """`logits` from what `inputs` computed."""
        if self.embedding is not None:
            # One-hot over all groups' slots times a block-diagonal table: the same numbers as an
            # embedding lookup, but matmuls forward and backward (a lookup's backward is 2x slower).
            emb = slots @ (self.embedding.weight.repeat(1, self.n_groups) * self.group_block)
            z = torch.cat([z, emb], dim=1)
        h = self.trunk(z)
        return torch.cat([self.route_head(h), self.retry_head(h)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities ``[N, 1 + n_buckets]``: column 0 route, columns 1.. retry per bucket."""
        return torch.sigmoid(self.logits(x) * self.cal_scale + self.cal_bias)


class EnsembleNet(nn.Module):
    """Several `ApprovalNet`s trained alike from different seeds, served as one: the mean of their
    logits, Platt-calibrated once for the whole.

    Why: the route the policy picks is the one with the highest estimate, so whatever noise a single
    net's training leaves in its estimates turns into an upward bias of the chosen route's P(approve)
    and into routing mistakes (docs/model.md). Averaging nets whose noise is independent shrinks it.
    The members' own calibrations are not used.
    """

    n_inputs: Final[int]
    n_buckets: Final[int]
    shared_inputs: Final[bool]
    cal_scale: torch.Tensor
    cal_bias: torch.Tensor

    def __init__(self, members: Sequence[ApprovalNet]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        first = members[0]
        if any(m.n_inputs != first.n_inputs or m.n_buckets != first.n_buckets for m in members):
            raise ValueError("ensemble members must share n_inputs and n_buckets")
        self.n_inputs = first.n_inputs
        self.n_buckets = first.n_buckets
        self.members = nn.ModuleList(members)
        # Members fitted on one split share their normalization and groups: `inputs` once for all.
        buffers = ("mean", "std", "numeric_cols", "group_cols", "group_valid", "group_sizes", "group_offsets")
        self.shared_inputs = all(
            (m.embedding is None) == (first.embedding is None)
            and all(torch.equal(getattr(m, b), getattr(first, b)) for b in buffers)
            for m in members
        )
        self.register_buffer("cal_scale", torch.ones(1 + self.n_buckets, dtype=torch.float32))
        self.register_buffer("cal_bias", torch.zeros(1 + self.n_buckets, dtype=torch.float32))

    @torch.jit.unused
    def set_calibration(
        self, scale: torch.Tensor | Sequence[float], bias: torch.Tensor | Sequence[float]
    ) -> None:
        """Set the per-output-column Platt calibration of the mean logit."""
        _set_calibration(self, scale, bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The members' mean pre-sigmoid, uncalibrated outputs ``[N, 1 + n_buckets]``."""
        total = torch.zeros(x.size(0), 1 + self.n_buckets, dtype=x.dtype, device=x.device)
        z, slots = x, x
        first = True
        # No isinstance(member, ApprovalNet) here: TorchScript resolves it against the first
        # ApprovalNet type it compiled in the process, and a net of another shape then fails it.
        # (No `continue` either: TorchScript unrolls a loop over a ModuleList and refuses one.)
        for member in self.members:
            if self.shared_inputs:
                if first:
                    z, slots = member.inputs(x)  # type: ignore[operator]
                    first = False
                total = total + member.logits_from(z, slots)  # type: ignore[operator]
            else:
                total = total + member.logits(x)  # type: ignore[operator]
        return total / float(len(self.members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities ``[N, 1 + n_buckets]``: column 0 route, columns 1.. retry per bucket."""
        return torch.sigmoid(self.logits(x) * self.cal_scale + self.cal_bias)


class FusedEnsembleNet(nn.Module):
    """An `EnsembleNet` as the server runs it: its members' layers side by side, a few wide ops.

    The members share their inputs (standardization, one-hot slots), so their first layers become
    one matmul (``[N, members × hidden]``; each member's embedding table is folded into its first
    layer's weights), their second layers one batched matmul, and their heads one matmul whose
    weights are divided by the member count: the mean logit comes out directly. The same numbers
    as `EnsembleNet.forward` up to float rounding (sums in another order; ~1e-7), in about half the
    operator calls (`python -m bench.model_forward`). Built from a trained ensemble at export
    (`model.export`); it holds copies, not the members.
    """

    n_inputs: Final[int]
    n_buckets: Final[int]
    n_groups: Final[int]
    max_group: Final[int]
    n_slots: Final[int]
    n_members: Final[int]
    hidden: Final[int]
    mean: torch.Tensor
    std: torch.Tensor
    numeric_cols: torch.Tensor
    group_cols: torch.Tensor
    group_valid: torch.Tensor
    group_sizes: torch.Tensor
    group_offsets: torch.Tensor
    w_numeric: torch.Tensor
    w_slots: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    w_heads: torch.Tensor
    b_heads: torch.Tensor
    cal_scale: torch.Tensor
    cal_bias: torch.Tensor

    def __init__(self, ensemble: EnsembleNet) -> None:
        super().__init__()
        if not self.can_fuse(ensemble):
            raise ValueError("only an ensemble whose members share inputs and embed their groups fuses")
        members: list[ApprovalNet] = list(ensemble.members)  # type: ignore[arg-type]
        first = members[0]
        first_layer = first.trunk[0]
        assert isinstance(first_layer, nn.Linear)
        self.n_inputs = first.n_inputs
        self.n_buckets = first.n_buckets
        self.n_groups = first.n_groups
        self.max_group = first.max_group
        self.n_slots = first.n_slots
        self.n_members = len(members)
        self.hidden = first_layer.out_features
        for name in (
            "mean",
            "std",
            "numeric_cols",
            "group_cols",
            "group_valid",
            "group_sizes",
            "group_offsets",
        ):
            self.register_buffer(name, getattr(first, name).detach().clone())
        n_numeric = first.numeric_cols.numel()
        w_numeric: list[torch.Tensor] = []
        w_slots: list[torch.Tensor] = []
        b1: list[torch.Tensor] = []
        w2: list[torch.Tensor] = []
        b2: list[torch.Tensor] = []
        w_heads: list[torch.Tensor] = []
        b_heads: list[torch.Tensor] = []
        with torch.no_grad():
            for m in members:
                l1, l2 = m.trunk[0], m.trunk[2]
                assert isinstance(l1, nn.Linear) and isinstance(l2, nn.Linear) and m.embedding is not None
                table = m.embedding.weight.repeat(1, m.n_groups) * m.group_block  # [slots, G × embed]
                w_numeric.append(l1.weight[:, :n_numeric].T)
                w_slots.append(table @ l1.weight[:, n_numeric:].T)
                b1.append(l1.bias)
                w2.append(l2.weight.T)
                b2.append(l2.bias)
                w_heads.append(torch.cat([m.route_head.weight, m.retry_head.weight]).T)
                b_heads.append(torch.cat([m.route_head.bias, m.retry_head.bias]))
            k = float(len(members))
            self.register_buffer("w_numeric", torch.cat(w_numeric, 1).contiguous())  # [numeric, K × H]
            self.register_buffer("w_slots", torch.cat(w_slots, 1).contiguous())  # [slots, K × H]
            self.register_buffer("b1", torch.cat(b1).contiguous())
            self.register_buffer("w2", torch.stack(w2).contiguous())  # [K, H, H]
            self.register_buffer("b2", torch.stack(b2).unsqueeze(1).contiguous())  # [K, 1, H]
            self.register_buffer("w_heads", (torch.cat(w_heads) / k).contiguous())  # [K × H, 1 + B]
            self.register_buffer("b_heads", (torch.stack(b_heads).sum(0) / k).contiguous())
            self.register_buffer("cal_scale", ensemble.cal_scale.detach().clone())
            self.register_buffer("cal_bias", ensemble.cal_bias.detach().clone())

    @staticmethod
    @torch.jit.unused
    def can_fuse(ensemble: EnsembleNet) -> bool:
        return bool(ensemble.shared_inputs) and all(
            getattr(m, "embedding", None) is not None for m in ensemble.members
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities ``[N, 1 + n_buckets]``, as `EnsembleNet.forward`."""
        if x.dim() != 2 or x.size(1) != self.n_inputs:
            raise ValueError(
                "FusedEnsembleNet expects input [N, " + str(self.n_inputs) + "], got " + str(list(x.shape))
            )
        n = x.size(0)
        z = ((x - self.mean) / self.std).clamp(-6.0, 6.0).index_select(1, self.numeric_cols)
        slots = _slots(
            x, self.group_cols, self.group_valid, self.group_sizes, self.group_offsets,
            self.n_groups, self.max_group, self.n_slots,
        )  # fmt: skip
        h = torch.relu(torch.addmm(self.b1, z, self.w_numeric) + slots @ self.w_slots)
        h = h.view(n, self.n_members, self.hidden).transpose(0, 1)  # [K, N, H]
        h = torch.relu(torch.baddbmm(self.b2, h, self.w2))
        h = h.transpose(0, 1).reshape(n, self.n_members * self.hidden)
        return torch.sigmoid(torch.addmm(self.b_heads, h, self.w_heads) * self.cal_scale + self.cal_bias)
