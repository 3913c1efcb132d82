"""GaLore and Tensor-GaLore as Optax gradient transformations.

Both keep the base optimizer's state (Adam's moments by default) in a low-rank
space: each selected gradient G is projected (R = P^H G, G Q, or a Tucker core),
the base optimizer runs on R, its update is projected back and multiplied by
`scale`. Projectors are refreshed from the gradient every `update_proj_gap`
steps, with a randomized (default) or exact SVD, under `lax.switch` so that
other steps pay nothing for it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from galore_jax import _sharding_ops as sops
from galore_jax import projection as proj
from galore_jax.projection import DimensionNumbers

__all__ = [
    "ScaleByGaloreState",
    "ScaleByTensorGaloreState",
    "scale_by_galore",
    "scale_by_tensor_galore",
]


class ScaleByGaloreState(NamedTuple):
  """State of `scale_by_galore` (arrays only: jit, sharding and orbax just work)."""

  count: jax.Array  # shape=(), dtype=jnp.int32. Updates applied so far.
  key: jax.Array  # shape=(2,), dtype=jnp.uint32. PRNG key for randomized refreshes.
  projectors: Any  # per param: tuple of projector arrays (() where not projected).
  base_state: optax.OptState  # base optimizer state over the low-rank gradients.


class ScaleByTensorGaloreState(NamedTuple):
  """State of `scale_by_tensor_galore` (arrays only)."""

  count: jax.Array  # shape=(), dtype=jnp.int32.
  key: jax.Array  # shape=(2,), dtype=jnp.uint32.
  factors: Any  # per param: tuple of (d_k, r_k) Tucker factors (() where not projected).
  base_state: optax.OptState  # base optimizer state over the Tucker cores.


# ----------------------------------------------------------------------------
# Argument checking (at construction / init, never inside a trace).
# ----------------------------------------------------------------------------

_INJECT_HINT = ("with optax.inject_hyperparams pass static_args=('rank', 'update_proj_gap', "
                "'oversample', 'power_iters', 'seed', 'dimension_numbers')")


def _static_int(name: str, value, *, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    if isinstance(value, jax.Array):
      raise TypeError(f"{name} must be a static Python int, got a jax.Array; {_INJECT_HINT}")
    raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return value


def _check_rank_value(rank, name: str = "rank"):
  if isinstance(rank, jax.Array):
    raise TypeError(f"{name} must be a static int or float, got a jax.Array; {_INJECT_HINT}")
  if isinstance(rank, bool) or not isinstance(rank, (int, float)):
    raise TypeError(f"{name} must be an int (> 0) or a float fraction in (0, 1], got {rank!r}")
  if isinstance(rank, int) and rank <= 0:
    raise ValueError(f"{name} must be a positive int, got {rank}")
  if isinstance(rank, float) and not 0.0 < rank <= 1.0:
    raise ValueError(f"{name} as a fraction must be in (0, 1], got {rank}")


def _check_choice(name: str, value, choices):
  if value not in choices:
    raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_common(update_proj_gap, oversample, power_iters, seed, svd, on_refresh):
  _static_int("update_proj_gap", update_proj_gap, minimum=1)
  _static_int("oversample", oversample, minimum=0)
  _static_int("power_iters", power_iters, minimum=0)
  _static_int("seed", seed, minimum=0)
  _check_choice("svd", svd, proj.SVD_METHODS)
  _check_choice("on_refresh", on_refresh, proj.ON_REFRESH)


def _leaf_paths(tree):
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = ["/".join(_key_name(k) for k in path) or "<root>" for path, _ in leaves_with_path]
  return paths, [leaf for _, leaf in leaves_with_path], treedef


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _check_leaf_dtype(transform: str, path: str, leaf):
  dtype = jnp.result_type(leaf)
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(
        f"{transform}: leaf '{path}' has dtype {dtype}; GaLore needs float or complex leaves. "
        "Keep integer/bool leaves out of the optimizer (optax.masked / optax.partition, or "
        "galore_adamw's labels).")


# ----------------------------------------------------------------------------
# The shared low-rank machinery.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Projection:
  """Per-plan operations; one instance for matrix GaLore, one for Tucker."""

  init: Callable  # (plan, dtype) -> tuple of projector arrays
  low_shape: Callable  # plan -> shape of the low-rank gradient
  to_low: Callable  # (plan, g, projectors) -> low-rank gradient
  from_low: Callable  # (plan, low, projectors) -> full gradient
  refresh: Callable  # (plan, g, old, *, key, warm) -> new projectors
  rotate: Callable  # (plan, moment, old, new, *, second) -> moment


def _matrix_projection(svd, oversample, power_iters) -> _Projection:
  def refresh(plan, g, old, *, key, warm):
    return proj.refresh_projectors(plan, plan.to_standard(g), old, svd=svd, key=key,
                                   oversample=oversample, power_iters=power_iters, warm=warm)

  def rotate(plan, moment, old, new, *, second):
    return proj.rotate_moment(moment, proj.rotation(plan, old, new), second=second)

  return _Projection(
      init=proj.init_projectors,
      low_shape=lambda plan: plan.low_rank_shape(),
      to_low=lambda plan, g, p: proj.project(plan, plan.to_standard(g), p),
      from_low=lambda plan, low, p: plan.from_standard(proj.project_back(plan, low, p)),
      refresh=refresh,
      rotate=rotate,
  )


def _tucker_projection(svd, oversample, power_iters) -> _Projection:
  def refresh(plan, g, old, *, key, warm):
    return proj.tucker_refresh(plan, g, old, svd=svd, key=key, oversample=oversample,
                               power_iters=power_iters, warm=warm)

  return _Projection(
      init=lambda plan, dtype: tuple(jnp.zeros(s, dtype) for s in plan.factor_shapes()),
      low_shape=lambda plan: plan.core_shape(),
      to_low=proj.tucker_project,
      from_low=proj.tucker_project_back,
      refresh=refresh,
      rotate=lambda plan, m, old, new, *, second: proj.tucker_rotate_moment(
          plan, m, old, new, second=second),
  )


def _increment(count):
  # Saturates instead of wrapping at int32 max (as optax's counters do).
  return jnp.where(count < jnp.iinfo(jnp.int32).max, count + 1, count)


def _refresh_offsets(num_projected: int, gap: int, stagger: bool):
  if not stagger or num_projected == 0:
    return [0] * num_projected
  return [(i * gap) // num_projected for i in range(num_projected)]


def _map_base_moments(base_state, low_tree, per_leaf: Callable):
  """Applies per_leaf(i, moment, second) to every low-rank moment tree in base_state.

  A moment tree is any subtree with the low-rank gradients' structure and
  shapes (Adam's mu and nu, momentum traces, ...). Fields named `nu` (or `v`)
  are treated as second moments.
  """
  low_leaves, low_def = jax.tree.flatten(low_tree)
  shapes = [jnp.shape(x) for x in low_leaves]

  def is_moment_tree(node):
    try:
      leaves = low_def.flatten_up_to(node)
    except (ValueError, TypeError):
      return False
    return all(hasattr(x, "shape") and x.shape == s for x, s in zip(leaves, shapes))

  def visit(node, field):
    if is_moment_tree(node):
      leaves = low_def.flatten_up_to(node)
      second = field in ("nu", "v", "exp_avg_sq")
      return low_def.unflatten([per_leaf(i, x, second) for i, x in enumerate(leaves)])
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      return type(node)(*[visit(getattr(node, f), f) for f in node._fields])
    if isinstance(node, (tuple, list)):
      return type(node)(visit(c, field) for c in node)
    if isinstance(node, dict):
      return type(node)({k: visit(v, field) for k, v in node.items()})
    return node

  return visit(base_state, None)


def _low_rank_transform(
    *,
    make_plans: Callable,  # params -> (paths, leaves, treedef, plans list with None)
    projection: _Projection,
    update_proj_gap: int,
    scale,
    base_optimizer: optax.GradientTransformation,
    warm_start: bool,
    on_refresh: str,
    stagger: bool,
    projector_dtype,
    seed: int,
    state_cls,
) -> optax.GradientTransformationExtraArgs:
  base_optimizer = optax.with_extra_args_support(base_optimizer)

  def low_rank_tree(leaves, plans, treedef):
    low = [x if p is None else jnp.zeros(projection.low_shape(p), jnp.result_type(x))
           for x, p in zip(leaves, plans)]
    return treedef.unflatten(low)

  def init_fn(params):
    _, leaves, treedef, plans = make_plans(params)
    projectors = [
        () if p is None else projection.init(p, projector_dtype or jnp.result_type(x))
        for x, p in zip(leaves, plans)
    ]
    low = low_rank_tree([jnp.zeros_like(x) for x in leaves], plans, treedef)
    return state_cls(
        jnp.zeros([], jnp.int32),
        jax.random.PRNGKey(seed),
        treedef.unflatten(projectors),
        base_optimizer.init(low),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params
    _, grads, treedef, plans = make_plans(updates)
    old_projectors = treedef.flatten_up_to(state[2])
    count = state.count
    key, step_key = jax.random.split(state.key)
    projected = [i for i, p in enumerate(plans) if p is not None]
    offsets = dict(zip(projected, _refresh_offsets(len(projected), update_proj_gap, stagger)))

    refresh_flags, new_projectors, low = {}, [], []
    for i, (g, plan, old) in enumerate(zip(grads, plans, old_projectors)):
      if plan is None:
        new_projectors.append(old)
        low.append(g)
        continue
      phase = count % update_proj_gap
      refresh = (count == 0) | ((phase == offsets[i]) & (count >= update_proj_gap))
      refresh_flags[i] = refresh
      leaf_key = jax.random.fold_in(step_key, i)
      branches = [
          lambda g, old: old,
          lambda g, old, plan=plan, k=leaf_key: projection.refresh(plan, g, old, key=k, warm=False),
      ]
      branch = refresh.astype(jnp.int32)
      if warm_start:
        branches.append(
            lambda g, old, plan=plan, k=leaf_key: projection.refresh(plan, g, old, key=k, warm=True))
        branch = jnp.where(refresh & (count > 0), 2, branch)
      new = jax.lax.switch(branch, branches, g, old)
      new_projectors.append(new)
      low.append(projection.to_low(plan, g, new).astype(jnp.result_type(g)))

    base_state = state.base_state
    if on_refresh != "keep" and projected:
      base_state = _map_base_moments(
          base_state, treedef.unflatten(low),
          lambda i, m, second: _on_refresh_moment(
              i, m, second, plans, refresh_flags, old_projectors, new_projectors))

    low_updates, base_state = base_optimizer.update(treedef.unflatten(low), base_state, None,
                                                    **extra_args)
    low_updates = treedef.flatten_up_to(low_updates)
    out = []
    for g, plan, u, p in zip(grads, plans, low_updates, new_projectors):
      if plan is None:
        out.append(u)
      else:
        out.append((projection.from_low(plan, u, p) * scale).astype(jnp.result_type(g)))
    new_state = state_cls(
        _increment(count),
        key,
        treedef.unflatten(new_projectors),
        base_state,
    )
    return treedef.unflatten(out), new_state

  def _on_refresh_moment(i, moment, second, plans, flags, old, new):
    plan = plans[i]
    if plan is None:
      return moment
    if on_refresh == "reset":
      return jnp.where(flags[i], jnp.zeros_like(moment), moment)
    return jax.lax.cond(
        flags[i],
        lambda m: sops.match_sharding(
            projection.rotate(plan, m, old[i], new[i], second=second), m),
        lambda m: m,
        moment)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_dims_leaf(x):
  return x is None or isinstance(x, DimensionNumbers)


def _resolve_dimension_numbers(dimension_numbers, params, leaf_keypaths):
  """Per-leaf DimensionNumbers (or None), from any accepted form; clear errors.

  A pytree is matched to the params by key path, so it also fits the masked
  sub-trees that `optax.partition` hands to an inner transform.
  """
  if dimension_numbers is None:
    return [None] * len(leaf_keypaths)
  if isinstance(dimension_numbers, DimensionNumbers):
    n = 2 + len(dimension_numbers.batch_axes)
    return [dimension_numbers if len(shape) == n else None for _, shape in leaf_keypaths]
  tree = dimension_numbers(params) if callable(dimension_numbers) else dimension_numbers
  by_path = dict(jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_dims_leaf)[0])
  per_leaf = []
  for keypath, _ in leaf_keypaths:
    if keypath not in by_path:
      raise ValueError(
          "dimension_numbers does not match the params' structure: no entry for "
          f"'{jax.tree_util.keystr(keypath)}'. Give a pytree with the params' structure holding "
          "DimensionNumbers or None at each leaf, one DimensionNumbers for all leaves, or a "
          "callable params -> such a pytree")
    d = by_path[keypath]
    if d is not None and not isinstance(d, DimensionNumbers):
      raise TypeError(f"dimension_numbers entries must be DimensionNumbers or None, got {d!r}")
    per_leaf.append(d)
  return per_leaf


def scale_by_galore(
    rank: Union[int, float] = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    svd: str = "randomized",
    oversample: int = 8,
    power_iters: int = 1,
    warm_start: bool = True,
    on_refresh: str = "keep",
    stagger: bool = False,
    base_optimizer: Optional[optax.GradientTransformation] = None,
    dimension_numbers: Union[None, DimensionNumbers, Any, Callable[[Any], Any]] = None,
    projector_dtype: Optional[Any] = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """GaLore: runs `base_optimizer` on low-rank projections of matrix gradients.

  Every leaf with two matrix axes (plus optional batch axes, see
  `dimension_numbers`) is projected; leaves with fewer than two axes go to the
  base optimizer in full space, unscaled (as galore-torch's non-GaLore group).
  N-D leaves without dimension numbers are flattened to (d0, prod(rest)).

  Projection side (fixed per leaf at trace time, galore-torch semantics for an
  m x n gradient): `std` projects on the right (G Vh_r^H, moments m x r) when
  m >= n, else on the left (U_r^H G, moments r x n); `reverse_std` the
  opposite; `left` / `right` forced; `full` both (U_r^H G Vh_r^H, r x r).

  Refresh schedule: every leaf refreshes at step 0 from the first gradient.
  Without `stagger` all leaves then refresh together at steps T, 2T, ...
  With `stagger`, leaf i (among the projected leaves, in tree order) refreshes
  at k*T + offset_i for k >= 1, offsets spread evenly over [0, T), so no single
  step pays for every SVD. Stacked layers of one leaf refresh together.

  `on_refresh` says what happens to the base optimizer's low-rank moments when
  a leaf's subspace changes:
    * "keep" (galore-torch): left as they are, reinterpreted in the new basis.
    * "reset": set to zero (the base optimizer's shared step count, and so its
      bias correction, is not reset).
    * "project": first moments are rotated into the new basis with
      P_new^H P_old (exact for the part of the moment inside both subspaces).
      Second moments are per-coordinate magnitudes that cannot be rotated: they
      are mapped with the elementwise-squared rotation |P_new^H P_old|^2, which
      is exact when the old coordinates are uncorrelated and keeps their scale.

  Args:
    rank: int rank, or float in (0, 1] as a fraction of the projected dim.
    update_proj_gap: steps between subspace refreshes (T).
    scale: multiplies the projected-back update (GaLore's alpha). May be an array.
    proj_type: "std" | "reverse_std" | "left" | "right" | "full".
    svd: "randomized" (GaLore 2 range finder, Cholesky-QR + eigh) or "exact".
    oversample: extra sketch columns for the randomized SVD.
    power_iters: power iterations for the randomized SVD.
    warm_start: start the randomized range finder from the previous basis.
    on_refresh: "keep" | "reset" | "project" (see above).
    stagger: spread the leaves' refreshes over the gap.
    base_optimizer: transformation run on the low-rank gradients; default
      `optax.scale_by_adam()`. It must not need `params` (they are not low-rank).
    dimension_numbers: `DimensionNumbers(batch_axes=...)` for all leaves, a
      pytree matching the params of DimensionNumbers or None, or a callable
      params -> such a pytree. Batch axes (e.g. the layer axis of scanned
      weights of shape (L, m, n)) get independent projectors.
    projector_dtype: dtype to store projectors in (default: the param's).
    seed: seed of the PRNG key kept in the state.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import galore_jax as gj
    >>> params = {"w": jnp.ones((16, 8)), "b": jnp.zeros((8,))}
    >>> tx = optax.chain(gj.scale_by_galore(rank=4, update_proj_gap=10), optax.scale(-1e-2))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(tx.update)(grads, state)
    >>> updates["w"].shape, state[0].projectors["w"][0].shape
    ((16, 8), (4, 8))

  References:
    Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection, ICML 2024. https://arxiv.org/abs/2403.03507
    Su et al., GaLore 2: Large-Scale LLM Pre-Training by Gradient Low-Rank
    Projection, 2025. https://arxiv.org/abs/2504.20437
  """
  _check_rank_value(rank)
  _check_common(update_proj_gap, oversample, power_iters, seed, svd, on_refresh)
  _check_choice("proj_type", proj_type, proj.PROJ_TYPES)

  def make_plans(params):
    paths, leaves, treedef = _leaf_paths(params)
    keypaths = [(kp, jnp.shape(x)) for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    dims = _resolve_dimension_numbers(dimension_numbers, params, keypaths)
    plans = []
    for path, leaf, d in zip(paths, leaves, dims):
      _check_leaf_dtype("scale_by_galore", path, leaf)
      ndim = jnp.ndim(leaf) - (len(d.batch_axes) if d is not None else 0)
      if ndim < 2:
        if d is not None:
          raise ValueError(
              f"dimension_numbers for '{path}' leave {ndim} matrix axes for a leaf of shape "
              f"{jnp.shape(leaf)}; exactly 2 must remain")
        plans.append(None)
      else:
        plans.append(proj.matrix_plan(jnp.shape(leaf), d, proj_type, rank, path))
    return paths, leaves, treedef, plans

  return _low_rank_transform(
      make_plans=make_plans,
      projection=_matrix_projection(svd, oversample, power_iters),
      update_proj_gap=update_proj_gap, scale=scale,
      base_optimizer=base_optimizer or optax.scale_by_adam(),
      warm_start=warm_start and svd == "randomized", on_refresh=on_refresh, stagger=stagger,
      projector_dtype=projector_dtype, seed=seed, state_cls=ScaleByGaloreState)


def scale_by_tensor_galore(
    rank: Union[int, float, Sequence[Union[int, float, None]]] = 0.25,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    modes: Optional[Sequence[int]] = None,
    svd: str = "exact",
    oversample: int = 8,
    power_iters: int = 1,
    warm_start: bool = True,
    on_refresh: str = "keep",
    stagger: bool = False,
    base_optimizer: Optional[optax.GradientTransformation] = None,
    projector_dtype: Optional[Any] = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """Tensor-GaLore: base optimizer on the Tucker core of N-D gradients.

  For each leaf with >= 2 axes, factor k is the top r_k left singular vectors
  of the gradient's mode-k unfolding (HOSVD, sign-canonical); the base
  optimizer sees the core G x_k U_k^H and its update is mapped back with
  core x_k U_k, times `scale`. Complex leaves (FNO spectral weights) use
  conjugate transposes; the default `optax.scale_by_adam` keeps |g|^2 in its
  second moment for them. Factors are recomputed from the current gradient at
  step 0 and every `update_proj_gap` steps (staggered if asked, as in
  `scale_by_galore`). Leaves with fewer than 2 axes get the base optimizer in
  full space.

  Args:
    rank: one rank for every projected mode (int, or float fraction of each
      mode's size), or a per-mode tuple (None leaves a mode unprojected).
    update_proj_gap: steps between refreshes.
    scale: multiplies the projected-back update.
    modes: which modes to project (default: all).
    svd: "exact" or "randomized" per-mode SVD.
    oversample, power_iters, warm_start: randomized SVD settings.
    on_refresh: "keep" | "reset" | "project" (moments rotated mode by mode).
    stagger: spread leaves' refreshes over the gap.
    base_optimizer: default `optax.scale_by_adam()`.
    projector_dtype: dtype of the stored factors (default: the param's).
    seed: PRNG seed.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import galore_jax as gj
    >>> w = jnp.ones((8, 8, 4, 4), jnp.complex64)
    >>> tx = gj.scale_by_tensor_galore(rank=0.5, update_proj_gap=50)
    >>> state = tx.init({"w": w})
    >>> [f.shape for f in state.factors["w"]]
    [(8, 4), (8, 4), (4, 2), (4, 2)]

  References:
    George et al., Tensor-GaLore: Memory-Efficient Training via Gradient
    Tensor Decomposition, 2025. https://arxiv.org/abs/2501.02379
  """
  if isinstance(rank, (tuple, list)):
    for i, r in enumerate(rank):
      if r is not None:
        _check_rank_value(r, f"rank[{i}]")
  else:
    _check_rank_value(rank)
  _check_common(update_proj_gap, oversample, power_iters, seed, svd, on_refresh)

  def make_plans(params):
    paths, leaves, treedef = _leaf_paths(params)
    plans = []
    for path, leaf in zip(paths, leaves):
      _check_leaf_dtype("scale_by_tensor_galore", path, leaf)
      if jnp.ndim(leaf) < 2:
        plans.append(None)
      else:
        plans.append(proj.tucker_plan(jnp.shape(leaf), rank, modes, path))
    return paths, leaves, treedef, plans

  return _low_rank_transform(
      make_plans=make_plans,
      projection=_tucker_projection(svd, oversample, power_iters),
      update_proj_gap=update_proj_gap, scale=scale,
      base_optimizer=base_optimizer or optax.scale_by_adam(),
      warm_start=warm_start and svd == "randomized", on_refresh=on_refresh, stagger=stagger,
      projector_dtype=projector_dtype, seed=seed, state_cls=ScaleByTensorGaloreState)
