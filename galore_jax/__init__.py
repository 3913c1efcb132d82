"""galore-jax: GaLore 2 and Tensor-GaLore as composable Optax transforms."""
from galore_jax.linalg import (canonicalize_signs, exact_svd, hosvd, mode_fold, mode_product,
                               mode_unfold, orthonormalize, randomized_svd, top_left_basis,
                               tucker_project, tucker_reconstruct)
from galore_jax.projection import DimensionNumbers
from galore_jax.transform import (ScaleByGaloreState, ScaleByTensorGaloreState, scale_by_galore,
                                  scale_by_tensor_galore)
