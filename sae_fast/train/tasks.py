"""One-feature steering tasks: what the demo, the synthetic task and the
tests share (model, SAE, data files, the steered feature and the reward's
token sets), and the config values that run one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SteeringTask:
    """A task steering one SAE feature in ``add`` mode within ``[-strength,
    strength]``, rewarded by ``token_preference`` over ``token_sets``
    ({"up": ids, "down": ids}, picked by probing the model).

    ``evidence`` records how the feature and token sets were chosen (probe
    token shares and samples)."""

    model_path: str
    sae_path: str
    train_path: str
    val_path: str
    feature: int
    layer: int
    token_sets: dict[str, list[int]]
    strength: float = 5.0
    evidence: dict = field(default_factory=dict)

    def overrides(self) -> dict[str, Any]:
        """Config values (dotted keys) that run this task."""
        s = float(self.strength)
        return {
            "model.path": self.model_path,
            "sae.model_path": self.sae_path,
            "sae.selected_features": [self.feature],
            "sae.target_layer": self.layer,
            "sae.mode": "add",
            "sae.min_strength": -s,
            "sae.max_strength": s,
            "data.train_files": [self.train_path],
            "data.val_files": [self.val_path],
            "reward.name": "token_preference",
            "reward.kwargs": {"token_sets": self.token_sets},
            "trainer.val_constant_grid": [s * (i - 4) / 4 for i in range(9)],  # 9 values
        }
