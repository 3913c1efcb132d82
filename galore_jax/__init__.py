"""galore-jax: GaLore 2 and Tensor-GaLore as composable Optax transforms."""
from galore_jax.linalg import (canonicalize_signs, exact_svd, hosvd, mode_fold, mode_product,
                               mode_unfold, orthonormalize, randomized_svd, top_left_basis,
                               tucker_project, tucker_reconstruct)
from galore_jax.projection import DimensionNumbers
from galore_jax.transform import (ScaleByGaloreState, ScaleByTensorGaloreState, scale_by_galore,
                                  scale_by_tensor_galore)
from galore_jax.adam import ScaleByTorchAdamState, scale_by_torch_adam
from galore_jax.labels import galore_labels
from galore_jax.alias import galore_adamw, tensor_galore_adamw
from galore_jax.sharding import state_shardings
from galore_jax.memory import adamw_state_bytes, memory_report, optimizer_state_bytes
