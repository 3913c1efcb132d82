"""What is trained: one package per task (``lm``, ``fno``), each its config schema,
data and task builder; :mod:`tasks.registry` maps the config's ``task:`` to them."""
