"""Orbax checkpoints of the whole training state, restorable onto any mesh.

One checkpoint (``<output_dir>/checkpoints/<step>/``) holds five items:

- ``params``    the model params, as a list of arrays (names in ``meta``);
- ``opt_state`` every array of the optimizer state (counters, moments,
                projectors, PRNG keys), also a flat list;
- ``data``      the data iterator position (JSON);
- ``config``    the run's config (JSON);
- ``meta``      step, leaf names/shapes/dtypes and the mesh it was saved on (JSON).

Why flat lists: optax states are nests of NamedTuples with empty nodes and
typed PRNG keys; flattening against the *current* run's abstract state makes
the stored layout trivial for orbax, and lets a structural mismatch be reported
as one sentence ("optimizer state differs: ...") instead of a deep traceback.

Orbax writes each step into a temporary directory and renames it when every
item is complete, and lists only finalized steps, so a run killed mid-save
leaves at most a temporary directory that is never loaded (and is cleaned up
by the next run).

A finalized checkpoint whose files were damaged later raises
:class:`DamagedCheckpointError`; ``train.py`` then skips it
(:meth:`Checkpointer.skip`), resumes from the newest intact one and moves
the damaged one aside (:meth:`Checkpointer.set_aside`). ``config_changes``
lists the settings a resumed run changed (``train.py`` prints them).
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import sys
import warnings
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import galore_jax as gj
from training.config import migrate_moved_keys

FORMAT_VERSION = 1
ITEM_NAMES = ("params", "opt_state", "data", "config", "meta")

# Config entries that fix array shapes or state layout; a checkpoint written
# with different values cannot be restored into this run. (Leaf names and
# shapes are checked too; this only makes the common mistakes read better.)
STRUCTURAL_CONFIG_KEYS = (
    "task",
    "model",
    "optimizer.name",
    "optimizer.rank",
    "optimizer.tensor_rank_mode",  # how a float tensor_galore rank becomes Tucker ranks
    "optimizer.proj_type",
    "optimizer.label_overrides",
    "optimizer.adam.bits",
    "optimizer.projector.bits",
    "optimizer.projector.group_size",
    "optimizer.master_dtype",  # the master copy lives in the state
    "optimizer.layerwise",  # per-group state, the layers' stacked
    "optimizer.grad_clip_mode",  # previous_global keeps a norm in the state
    "optimizer.projection",  # APOLLO: a key per param (random) or SVD projectors
)
# Model settings that change how the model runs, not its params: these may
# differ between a checkpoint and the run resuming it.
RUNTIME_MODEL_KEYS = ("remat", "dtype", "attention_implementation", "max_seq_len")

# Config entries that do not change what a resumed run computes (when it logs,
# evaluates, saves or stops, where it runs); ``config_changes`` leaves them out.
UNTRACKED_CONFIG_KEYS = (
    "output_dir",
    "stop_after",
    "log_every",
    "eval_every",
    "progress_bar",
    "step_timeout_s",
    "tensorboard",
    "checkpoint",
    "distributed",
)

# Orbax logs every save/restore at INFO; keep the training output readable.
logging.getLogger("absl").setLevel(logging.WARNING)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is printed as-is."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files cannot be read (truncated, overwritten, missing).

    Attributes:
      step: the damaged step.
      reason: the first line of what orbax / TensorStore reported.
    """

    def __init__(self, message: str, step: int, reason: str):
        super().__init__(message)
        self.step, self.reason = step, reason


def _is_prng_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def flatten_with_names(tree: Any) -> tuple[list[Any], list[str], Any]:
    """Leaves, their '/'-joined path names and the treedef of ``tree``."""
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [gj.paths.path_string(path) for path, _ in leaves_with_paths]
    return [leaf for _, leaf in leaves_with_paths], names, treedef


def _key_impl_name(leaf: Any) -> Optional[str]:
    """PRNG implementation name ("threefry2x32", ...) of a typed key or its shape."""
    impl = getattr(leaf.dtype, "_impl", None)  # no public accessor for abstract keys
    return getattr(impl, "name", None)  # None: jax's default implementation


def _storable(leaf: Any) -> Any:
    """Typed PRNG keys are stored as their raw ``uint32`` key data."""
    return jax.random.key_data(leaf) if _is_prng_key(leaf) else leaf


def _abstract_storable(leaf: Any, sharding: Optional[jax.sharding.Sharding]) -> Any:
    """Restore target for one leaf: shape, dtype and the sharding to load onto."""
    if _is_prng_key(leaf):
        data = jax.eval_shape(jax.random.key_data, leaf)
        mesh = getattr(sharding, "mesh", None)
        data_sharding = NamedSharding(mesh, P()) if mesh is not None else sharding
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=data_sharding)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _leaf_signature(leaf: Any) -> list:
    stored = jax.eval_shape(_storable, leaf) if _is_prng_key(leaf) else leaf
    return [list(stored.shape), str(jnp.dtype(stored.dtype))]


def _get_path(tree: Mapping, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are values)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


NOT_SET = "(not set)"


def _applies(key: str, optimizer_name: Any) -> bool:
    """Whether config ``key`` means anything for this optimizer: tensor_rank_mode is
    read by tensor_galore's float rank only, projection by APOLLO only."""
    if key == "optimizer.projection":
        return optimizer_name in ("apollo", "apollo_mini")
    return key != "optimizer.tensor_rank_mode" or optimizer_name == "tensor_galore"


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple]:
    """``(dotted key, saved value, current value)`` for each setting that differs,
    sorted by key, leaving out :data:`UNTRACKED_CONFIG_KEYS`. A key only one side
    has (a config written by another version) shows :data:`NOT_SET` on the other."""
    saved, current = _flatten(migrate_moved_keys(saved)[0]), _flatten(current)
    changes = []
    for key in sorted(set(saved) | set(current)):
        if any(key == k or key.startswith(k + ".") for k in UNTRACKED_CONFIG_KEYS):
            continue
        if not _applies(key, current.get("optimizer.name")):
            continue
        old, new = saved.get(key, NOT_SET), current.get(key, NOT_SET)
        if old != new:
            changes.append((key, old, new))
    return changes


def _diff(saved: Any, current: Any, prefix: str) -> list[str]:
    """Human-readable differences between two plain-data config values."""
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _diff(saved.get(key), current.get(key), f"{prefix}.{key}")
        return out
    if saved != current:
        return [f"{prefix.lstrip('.')}: checkpoint has {saved!r}, config has {current!r}"]
    return []


class Checkpointer:
    """Saves and restores the training state with an orbax ``CheckpointManager``.

    Args:
      directory: where the step directories go (created on the first save). A
        relative path is taken from the current directory (orbax needs absolute ones).
      max_to_keep: how many finalized checkpoints to keep.
      async_save: write in a background thread (the step loop keeps going).
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        self._skipped: set[int] = set()
        self._closed = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            # Remove what a killed run left half-written; never read anyway.
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=ITEM_NAMES
        )

    # -- queries ---------------------------------------------------------------

    def latest_step(self) -> Optional[int]:
        """Newest finalized step that was not skipped (:meth:`skip`), or None."""
        steps = [s for s in self._manager.all_steps() if s not in self._skipped]
        return max(steps) if steps else None

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def skip(self, step: int) -> None:
        """Leaves ``step`` out of :meth:`latest_step` (a damaged checkpoint); its files stay."""
        self._skipped.add(int(step))

    def set_aside(self, step: int, destination: str) -> str:
        """Moves checkpoint ``step`` out of the way, to ``destination/<step>``
        (``<step>.1``, ... if that exists), so that this run can save ``step``
        again and the ``max_to_keep`` rotation never deletes it. Every process
        calls this; process 0 moves. Returns the new path."""
        source = os.path.join(self.directory, str(step))
        target = os.path.join(os.path.abspath(destination), str(step))
        n = 0
        while os.path.exists(target):
            n += 1
            target = os.path.join(os.path.abspath(destination), f"{step}.{n}")
        _sync_processes(f"checkpoint_set_aside_{step}_start")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(source, target)
        _sync_processes(f"checkpoint_set_aside_{step}_done")
        self._manager.reload()
        self._skipped.discard(int(step))
        return target

    # -- save ------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        params: Any,
        opt_state: Any,
        data_state: Mapping[str, Any],
        config: Mapping[str, Any],
        mesh_shape: Optional[Mapping[str, int]] = None,
    ) -> bool:
        """Starts writing a checkpoint for ``step`` (a no-op if it already exists).

        Returns:
          True when a save was started.
        """
        if step in self._manager.all_steps():
            return False
        param_leaves, param_names, _ = flatten_with_names(params)
        opt_leaves, opt_names, _ = flatten_with_names(opt_state)
        meta = {
            "format": FORMAT_VERSION,
            "step": int(step),
            "params": dict(zip(param_names, map(_leaf_signature, param_leaves))),
            "opt_state": dict(zip(opt_names, map(_leaf_signature, opt_leaves))),
            "mesh": dict(mesh_shape or {}),
        }
        # Names go in as a list because key paths may repeat a name across nodes.
        meta["params_order"] = param_names
        meta["opt_state_order"] = opt_names
        args = ocp.args.Composite(
            params=ocp.args.StandardSave([_storable(x) for x in param_leaves]),
            opt_state=ocp.args.StandardSave([_storable(x) for x in opt_leaves]),
            data=ocp.args.JsonSave(dict(data_state)),
            config=ocp.args.JsonSave(dict(config)),
            meta=ocp.args.JsonSave(meta),
        )
        return bool(self._manager.save(step, args=args, force=True))

    def wait(self) -> None:
        """Blocks until any background save is finalized."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for background saves and closes orbax (again: a no-op)."""
        if self._closed:
            return
        self._closed = True
        self._manager.wait_until_finished()
        self._manager.close()

    # -- restore ---------------------------------------------------------------

    def read_config_and_meta(self, step: int) -> tuple[dict, dict]:
        """The JSON items of ``step`` (cheap; no arrays are read)."""
        _quiet_orbax_leftovers()
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()),
            )
            config, meta = restored["config"], restored["meta"]
        except Exception as e:  # orbax raises many types for damaged files
            _failed_restore()
            raise DamagedCheckpointError(
                f"checkpoint step {step} in {self.directory} is unreadable "
                f"({_short(e)}); delete it or use a new output_dir",
                step,
                _short(e),
            ) from None
        if not isinstance(meta, Mapping) or meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} has an unknown format"
            )
        config, _ = migrate_moved_keys(config)  # a checkpoint of galore-jax 0.2.0
        return config, dict(meta)

    def check_compatible(self, step: int, config: Mapping[str, Any]) -> None:
        """Raises :class:`CheckpointError` if ``config`` changes the state layout."""
        saved_config, _ = self.read_config_and_meta(step)
        problems = []
        for key in STRUCTURAL_CONFIG_KEYS:
            if not _applies(key, _get_path(config, "optimizer.name")):
                continue
            saved, current = _get_path(saved_config, key), _get_path(config, key)
            if key == "model" and isinstance(saved, Mapping) and isinstance(current, Mapping):
                saved, current = (
                    {k: v for k, v in tree.items() if k not in RUNTIME_MODEL_KEYS}
                    for tree in (saved, current)
                )
            problems += _diff(saved, current, key)
        if problems:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not match the config"
                f" ({'; '.join(problems[:3])}); use a new output_dir or the same"
                " settings"
            )

    def restore(
        self,
        step: int,
        *,
        abstract_params: Any,
        param_shardings: Any,
        abstract_opt_state: Any,
        opt_state_shardings: Any,
    ) -> tuple[Any, Any, dict]:
        """Loads ``step`` onto the current mesh.

        Args:
          abstract_params: pytree of ``ShapeDtypeStruct`` with the run's structure.
          param_shardings: matching pytree of shardings to place the params with
            (any mesh; orbax reshards on load).
          abstract_opt_state, opt_state_shardings: the same for the optimizer state.

        Returns:
          ``(params, opt_state, data_state)``.

        Raises:
          CheckpointError: the checkpoint is damaged or was written for a
            different model/optimizer layout.
        """
        _, meta = self.read_config_and_meta(step)
        targets = {}
        for item, abstract, shardings in (
            ("params", abstract_params, param_shardings),
            ("opt_state", abstract_opt_state, opt_state_shardings),
        ):
            leaves, names, treedef = flatten_with_names(abstract)
            sharding_leaves = treedef.flatten_up_to(shardings)
            expected = [_leaf_signature(x) for x in leaves]
            saved_names = meta.get(f"{item}_order", [])
            saved = meta.get(item, {})
            if item == "opt_state" and saved_names != names:
                saved_names, saved = _without_leafless_first_stage(saved_names, saved, names)
            if saved_names != names:
                missing = [n for n in names if n not in saved]
                extra = [n for n in saved_names if n not in set(names)]
                detail = (
                    f"missing {missing[:2]}"
                    if missing
                    else f"unexpected {extra[:2]}"
                    if extra
                    else "different order"
                )
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} has a different {item}"
                    f" structure ({detail}); it was written for another model or"
                    " optimizer"
                )
            for name, want in zip(names, expected):
                if saved[name] != want:
                    raise CheckpointError(
                        f"checkpoint step {step} in {self.directory}: {item} '{name}' has"
                        f" shape/dtype {saved[name]}, this run expects {want}"
                    )
            targets[item] = (
                [_abstract_storable(x, s) for x, s in zip(leaves, sharding_leaves)],
                leaves,
                treedef,
            )

        _quiet_orbax_leftovers()
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(targets["params"][0]),
                    opt_state=ocp.args.StandardRestore(targets["opt_state"][0]),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:
            _failed_restore()
            raise DamagedCheckpointError(
                f"checkpoint step {step} in {self.directory} could not be restored "
                f"({_short(e)}); delete it or use a new output_dir",
                step,
                _short(e),
            ) from None

        out = []
        for item in ("params", "opt_state"):
            _, abstract_leaves, treedef = targets[item]
            loaded = list(restored[item])
            leaves = [
                jax.random.wrap_key_data(value, impl=_key_impl_name(like))
                if _is_prng_key(like)
                else value
                for value, like in zip(loaded, abstract_leaves)
            ]
            out.append(jax.tree_util.tree_unflatten(treedef, leaves))
        return out[0], out[1], dict(restored["data"] or {})


def _without_leafless_first_stage(saved_names: list, saved: dict, names: list):
    """Names of a state saved as ``chain(stage, tx)`` whose first stage holds no
    arrays, as ``tx``'s own: the global-norm clip before GaLore (runs before
    GaLore clipped in the low-rank space) saved ``1/<name>`` for each of ``tx``'s
    ``<name>``. The arrays are stored in order, so only the names change; any
    other layout is returned as it is (and then reported as a mismatch)."""
    if not saved_names or not all(n.startswith("1/") for n in saved_names):
        return saved_names, saved
    stripped = [n[2:] for n in saved_names]
    if stripped != names:
        return saved_names, saved
    return stripped, {n[2:]: v for n, v in saved.items()}


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


_QUIET = False


def _quiet_orbax_leftovers() -> None:
    """Keeps what a failed orbax restore leaves behind off stderr, for the rest
    of the process (installed before each restore: the first reports can come
    before the failure reaches us). The restore's asyncio loop is closed while
    TensorStore reads are still in flight; each of them later reports
    "RuntimeError: Event loop is closed" (or its own read error, from a coroutine
    nobody awaits any more) as an unraisable exception, and asyncio logs "Future
    exception was never retrieved" for them. Only those are dropped; the error
    itself is raised as a CheckpointError."""
    global _QUIET
    if _QUIET:
        return
    _QUIET = True
    previous = sys.unraisablehook

    def hook(unraisable):
        error, obj = unraisable.exc_value, unraisable.object
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        code = getattr(obj, "cr_code", None) if inspect.iscoroutine(obj) else None
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_drop_abandoned_async_results)


def _failed_restore() -> None:
    """After a failed restore: no "coroutine ... was never awaited" warnings at exit
    for the reads it abandoned."""
    warnings.filterwarnings(
        "ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning
    )


def _drop_abandoned_async_results(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(
        (
            "Future exception was never retrieved",
            "Task exception was never retrieved",
            "Task was destroyed but it is pending",
        )
    )


def _short(error: BaseException) -> str:
    """First line of an exception, bounded, for one-line error messages."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
