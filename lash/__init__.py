"""LASH: Layered Adaptive Supervision Hierarchy.

Train transformer LMs with loss at any subset of layers through one shared head
(``layer_weights``), per-layer learning rates (``layer_lr_scales``) and confidence-based early
exit (``routing_threshold`` at ``exit_layer``).
"""

from lash.config import (
    ASHEMConfig,
    TrainingConfig,
    create_deep_supervision_config,
    create_standard_config,
)
from lash.data import create_wikitext_dataloaders, load_dataset
from lash.losses import multi_exit_loss
from lash.models import DeepSupervisionTransformer, StandardTransformer
from lash.routing import calibrate_threshold
from lash.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "ASHEMConfig",
    "DeepSupervisionTransformer",
    "StandardTransformer",
    "Trainer",
    "TrainingConfig",
    "calibrate_threshold",
    "create_deep_supervision_config",
    "create_standard_config",
    "create_wikitext_dataloaders",
    "load_dataset",
    "multi_exit_loss",
]
