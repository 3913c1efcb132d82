"""galore-jax: GaLore 2, Tensor-GaLore, Fira and APOLLO as composable Optax transforms.

What a user calls is here; linear algebra is the namespace `galore_jax.linalg`,
and each concept's module (`galore_jax.galore`, `.adam`, `.layerwise`, ...)
holds its less common pieces.
"""

import importlib as _importlib
import warnings as _warnings

from galore_jax import clipping as clipping
from galore_jax import linalg as linalg
from galore_jax._low_rank import GradScaleTransformation
from galore_jax.adam import scale_by_adam_8bit, scale_by_torch_adam
from galore_jax.alias import GALORE_ADAMW_STATIC_ARGS, galore_adamw, tensor_galore_adamw
from galore_jax.apollo import apollo_adamw, apollo_mini_adamw, scale_by_apollo
from galore_jax.complex_grads import conjugate_complex_grads
from galore_jax.describe import describe
from galore_jax.dimensions import DimensionNumbers
from galore_jax.fira import fira_adamw, scale_by_fira
from galore_jax.galore import scale_by_galore
from galore_jax.labels import galore_labels
from galore_jax.layerwise import layerwise_init, layerwise_step
from galore_jax.master import with_master_weights
from galore_jax.memory import memory_report
from galore_jax.options import (
    AdamOptions,
    ExactSVD,
    Labels,
    ProjectorStorage,
    RandomizedSVD,
    Tucker,
)
from galore_jax.scanned import ScannedModel
from galore_jax.sharding import state_shardings
from galore_jax.subspace import accumulate_in_subspace
from galore_jax.tensor_galore import scale_by_tensor_galore

__version__ = "0.3.0"

__all__ = [
    # transformations and optimizers
    "scale_by_galore",
    "scale_by_tensor_galore",
    "scale_by_fira",
    "scale_by_apollo",
    "galore_adamw",
    "tensor_galore_adamw",
    "fira_adamw",
    "apollo_adamw",
    "apollo_mini_adamw",
    "scale_by_adam_8bit",
    "scale_by_torch_adam",
    "conjugate_complex_grads",
    "with_master_weights",
    "GradScaleTransformation",
    "GALORE_ADAMW_STATIC_ARGS",
    # options
    "RandomizedSVD",
    "ExactSVD",
    "ProjectorStorage",
    "AdamOptions",
    "Tucker",
    "Labels",
    "DimensionNumbers",
    # inspection
    "describe",
    "memory_report",
    "galore_labels",
    # sharding, layer-wise updates, gradients accumulated in the subspace
    "state_shardings",
    "ScannedModel",
    "layerwise_init",
    "layerwise_step",
    "accumulate_in_subspace",
]

# Names of galore-jax 0.2.0's flat namespace -> their module now (CHANGELOG.md).
_MOVED = {
    "GALORE_STATIC_ARGS": ("galore_jax._checks", "STATIC_ARGS"),
    "TENSOR_GALORE_STATIC_ARGS": ("galore_jax._checks", "STATIC_ARGS"),
    "LayerwiseState": ("galore_jax.layerwise", "LayerwiseState"),
    "LeafTreatment": ("galore_jax.describe", "LeafTreatment"),
    "Treatment": ("galore_jax.describe", "Treatment"),
    "MasterWeightsState": ("galore_jax.master", "MasterWeightsState"),
    "MatrixProjectors": ("galore_jax.galore", "MatrixProjectors"),
    "ScaleByAdam8bitState": ("galore_jax.adam", "ScaleByAdam8bitState"),
    "ScaleByTorchAdamState": ("galore_jax.adam", "ScaleByTorchAdamState"),
    "adamw_state_bytes": ("galore_jax.memory", "adamw_state_bytes"),
    "optimizer_state_bytes": ("galore_jax.memory", "optimizer_state_bytes"),
    "infer_dimension_numbers": ("galore_jax.dimensions", "infer_dimension_numbers"),
    "labels_by_path": ("galore_jax.labels", "labels_by_path"),
    "one_layer_view": ("galore_jax.scanned", "one_layer_view"),
    "path_string": ("galore_jax.paths", "path_string"),
    "refresh_offsets": ("galore_jax._low_rank", "refresh_offsets"),
    # Moved to their modules in 0.4.0 (room in the namespace for Fira and APOLLO).
    "ScaleByGaloreState": ("galore_jax.galore", "ScaleByGaloreState"),
    "ScaleByTensorGaloreState": ("galore_jax.tensor_galore", "ScaleByTensorGaloreState"),
    "RankFallbackWarning": ("galore_jax.labels", "RankFallbackWarning"),
    "layerwise_state_shardings": ("galore_jax.layerwise", "layerwise_state_shardings"),
    "clip_by_layer_norm": ("galore_jax.clipping", "clip_by_layer_norm"),
    "clip_by_previous_global_norm": ("galore_jax.clipping", "clip_by_previous_global_norm"),
    **{name: ("galore_jax.linalg", name) for name in linalg.__all__},
}


_MOVED_IN_0_4_0 = (
    "ScaleByGaloreState",
    "ScaleByTensorGaloreState",
    "RankFallbackWarning",
    "layerwise_state_shardings",
    "clip_by_layer_norm",
    "clip_by_previous_global_norm",
)


def __getattr__(name):
    if name in _MOVED:
        module, attr = _MOVED[name]
        version = "0.4.0" if name in _MOVED_IN_0_4_0 else "0.3.0"
        _warnings.warn(
            f"gj.{name} moved to {module}.{attr} in galore-jax {version} (see CHANGELOG.md)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_importlib.import_module(module), attr)
    raise AttributeError(f"module 'galore_jax' has no attribute {name!r}")
