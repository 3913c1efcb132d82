"""The task registry: the config's ``task:`` value -> its config class and task builder.

=======  ==============================  =================================
task     config class (model, data)      task builder (its ``build_task()``)
=======  ==============================  =================================
``lm``   ``tasks.lm.config.LMConfig``    ``tasks.lm.task.build_lm_task``
``fno``  ``tasks.fno.config.FNOConfig``  ``tasks.fno.task.build_fno_task``
=======  ==============================  =================================

A config class is the task's schema (its ``model`` and ``data`` sections and
checks, on top of ``training.config.Config``); its ``build_task()`` imports and
calls the task's builder, so that loading a config imports neither jax nor a
model, and the runtime (``training.steps.build_run``) builds the task from the
config alone. ``training`` never imports this module: ``train.py`` loads its
config here. A new task adds a package under ``tasks/`` and a line to
:data:`TASKS`.
"""

from __future__ import annotations

from typing import Optional, Sequence

from tasks.fno.config import FNOConfig
from tasks.lm.config import LMConfig
from training import config as config_lib

TASKS = config_lib.TaskConfigs({"lm": LMConfig, "fno": FNOConfig}, default="lm")


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> config_lib.Config:
    """``training.config.load_config`` over :data:`TASKS`: a YAML file (or the
    defaults) with ``key=value`` overrides, validated as its ``task``'s config.

    Raises:
      ConfigError: unreadable file, unknown key or task, wrong type or bad value.
    """
    return config_lib.load_config(path, list(overrides), TASKS)


def config_from_dict(raw: dict) -> config_lib.Config:
    """``training.config.config_from_dict`` over :data:`TASKS`."""
    return config_lib.config_from_dict(raw, TASKS)
