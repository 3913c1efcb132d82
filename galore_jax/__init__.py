"""galore-jax: GaLore 2 and Tensor-GaLore as composable Optax transforms."""

from galore_jax.adam import ScaleByTorchAdamState, scale_by_torch_adam
from galore_jax.alias import GALORE_ADAMW_STATIC_ARGS, galore_adamw, tensor_galore_adamw
from galore_jax.complex_grads import conjugate_complex_grads
from galore_jax.describe import LeafTreatment, Treatment, describe
from galore_jax.labels import RankFallbackWarning, galore_labels, labels_by_path
from galore_jax.layerwise import (
    LayerwiseState,
    ScannedModel,
    clip_by_layer_norm,
    clip_by_previous_global_norm,
    layerwise_init,
    layerwise_state_shardings,
    layerwise_step,
    one_layer_view,
)
from galore_jax.linalg import (
    canonicalize_signs,
    exact_svd,
    hosvd,
    mode_fold,
    mode_product,
    mode_unfold,
    orthonormalize,
    randomized_svd,
    top_left_basis,
    tucker_project,
    tucker_reconstruct,
)
from galore_jax.master import MasterWeightsState, with_master_weights
from galore_jax.memory import adamw_state_bytes, memory_report, optimizer_state_bytes
from galore_jax.paths import path_string
from galore_jax.projection import DimensionNumbers, infer_dimension_numbers
from galore_jax.quantization import ScaleByAdam8bitState, scale_by_adam_8bit
from galore_jax.sharding import state_shardings
from galore_jax.transform import (
    GALORE_STATIC_ARGS,
    TENSOR_GALORE_STATIC_ARGS,
    GradScaleTransformation,
    MatrixProjectors,
    ScaleByGaloreState,
    ScaleByTensorGaloreState,
    refresh_offsets,
    scale_by_galore,
    scale_by_tensor_galore,
)

__version__ = "0.2.0"

__all__ = [
    "DimensionNumbers",
    "GALORE_ADAMW_STATIC_ARGS",
    "GALORE_STATIC_ARGS",
    "GradScaleTransformation",
    "LayerwiseState",
    "LeafTreatment",
    "MasterWeightsState",
    "MatrixProjectors",
    "RankFallbackWarning",
    "ScaleByAdam8bitState",
    "ScaleByGaloreState",
    "ScaleByTensorGaloreState",
    "ScaleByTorchAdamState",
    "ScannedModel",
    "TENSOR_GALORE_STATIC_ARGS",
    "Treatment",
    "adamw_state_bytes",
    "canonicalize_signs",
    "clip_by_layer_norm",
    "clip_by_previous_global_norm",
    "conjugate_complex_grads",
    "describe",
    "exact_svd",
    "galore_adamw",
    "galore_labels",
    "hosvd",
    "infer_dimension_numbers",
    "labels_by_path",
    "layerwise_init",
    "layerwise_state_shardings",
    "layerwise_step",
    "memory_report",
    "mode_fold",
    "mode_product",
    "mode_unfold",
    "one_layer_view",
    "optimizer_state_bytes",
    "orthonormalize",
    "path_string",
    "randomized_svd",
    "refresh_offsets",
    "scale_by_adam_8bit",
    "scale_by_galore",
    "scale_by_tensor_galore",
    "scale_by_torch_adam",
    "state_shardings",
    "top_left_basis",
    "with_master_weights",
    "tensor_galore_adamw",
    "tucker_project",
    "tucker_reconstruct",
]
