"""``task: fno``: a Fourier Neural Operator on generated PDE data.

``config`` (the ``model``/``data`` sections, ``FNOConfig``), ``pde`` (the Burgers
and Darcy generators, normalisers), ``task`` (``build_fno_task``, array batches).
"""
