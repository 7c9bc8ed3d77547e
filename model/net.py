"""The approval model: one row per (attempt, candidate route) in, probabilities out.

Output column 0 is P(approve) of this attempt on this route; column ``1 + b`` is P(approve) if the
declined payment is retried on this route after ``DELAY_BUCKETS_S[b]`` seconds. A shared trunk feeds
a route head and a retry head, so the retry estimates share what the trunk learned about the route and
the issuer. Inputs are normalized inside the module (mean/std buffers) so that the exported artifact
takes raw `model.layout` rows and the server never needs a separate preprocessing step.
"""

from collections.abc import Sequence
from typing import Final

import torch
from torch import nn

__all__ = ["ApprovalNet"]

_MIN_STD = 1e-6


class ApprovalNet(nn.Module):
    """A small MLP: float32 ``[N, n_inputs]`` → probabilities float32 ``[N, 1 + n_buckets]``.

    TorchScript-scriptable; `logits` is the pre-sigmoid output for training with
    ``BCEWithLogitsLoss`` (numerically stable), `forward` is what gets exported and served.
    """

    n_inputs: Final[int]
    n_buckets: Final[int]
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, n_inputs: int, n_buckets: int, hidden: int = 64) -> None:
        super().__init__()
        if n_inputs < 1 or n_buckets < 0 or hidden < 1:
            raise ValueError(
                f"bad ApprovalNet shape: n_inputs={n_inputs} n_buckets={n_buckets} hidden={hidden}"
            )
        self.n_inputs = n_inputs
        self.n_buckets = n_buckets
        self.register_buffer("mean", torch.zeros(n_inputs, dtype=torch.float32))
        self.register_buffer("std", torch.ones(n_inputs, dtype=torch.float32))
        self.trunk = nn.Sequential(
            nn.Linear(n_inputs, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.route_head = nn.Linear(hidden, 1)
        self.retry_head = nn.Linear(hidden, n_buckets)

    @torch.jit.unused
    def set_normalization(
        self, mean: torch.Tensor | Sequence[float], std: torch.Tensor | Sequence[float]
    ) -> None:
        """Set the per-input mean and std (e.g. from the training split).

        A (near-)zero std — a constant feature — is replaced by 1 so it is only centred.
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

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid outputs ``[N, 1 + n_buckets]``."""
        if x.dim() != 2 or x.size(1) != self.n_inputs:
            raise ValueError(
                "ApprovalNet expects input [N, " + str(self.n_inputs) + "], got " + str(list(x.shape))
            )
        h = self.trunk((x - self.mean) / self.std)
        return torch.cat([self.route_head(h), self.retry_head(h)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities ``[N, 1 + n_buckets]``: column 0 route, columns 1.. retry per delay bucket."""
        return torch.sigmoid(self.logits(x))
