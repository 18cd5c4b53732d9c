"""The estimator contract: ``latent`` [n, S, D] (torch, float64, on ``device``) -> one feature row per input."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


class Estimator(ABC):
    """Base of the aggregation estimators.

    Subclasses set ``output`` (the feature key they write, e.g. ``"entropy"``), implement :meth:`compute`
    (``[n, S, D]`` float64 tensor -> ``[n, D_out]`` tensor, vectorized over the rows) and :meth:`params`
    (what the result depends on: it goes into the aggregate hash).
    """

    output: str = "entropy"
    inputs: tuple[str, ...] = ("latent",)
    name: str = "estimator"

    @abstractmethod
    def compute(self, latent: torch.Tensor) -> torch.Tensor:
        """``latent`` [n, S, D] float64 -> [n, D_out], vectorized over the rows."""

    def params(self) -> dict[str, Any]:
        return {}

    def identity(self) -> dict[str, Any]:
        return {"output": self.output, "estimator": self.name, **self.params()}

    def __call__(self, arrays: Mapping[str, np.ndarray], device: str | torch.device = "cpu") -> np.ndarray:
        lat = arrays[self.inputs[0]]
        if not isinstance(lat, torch.Tensor):  # a tensor (extraction, on its device) is taken as it is
            lat = torch.from_numpy(np.ascontiguousarray(lat))
        x = lat.to(device=torch.device(device), dtype=torch.float64)
        if x.ndim != 3:
            raise ValueError(f"{type(self).__name__} needs MC latents [N, S, D]; got shape {tuple(x.shape)}")
        return self.compute(x).cpu().numpy()

    def transform(self, latent, device: str | torch.device = "cpu") -> np.ndarray:
        """``latent`` [N, S, D] (array or tensor) -> the estimate, one row per input (float64 numpy)."""
        if isinstance(latent, torch.Tensor):
            latent = latent.detach().cpu().numpy()
        return self({self.inputs[0]: latent}, device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"


def check_min(name: str, value, low: float) -> float:
    """``value`` as float, or ValueError unless it is a finite number >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < low:
        raise ValueError(f"{name} must be a finite number >= {low}; got {value!r}")
    return float(value)
