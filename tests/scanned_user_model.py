"""A user's own scanned model for the layer-wise tests: plain dict params, its own names
(an encoder, a trunk of stacked dense layers, a readout), written as three functions."""

import jax
import jax.numpy as jnp

import galore_jax as gj

# The trunk's leading axis is the layer axis: each layer's kernel is a matrix.
DIMS = {
    "encoder": None,
    "trunk": {"dense": {"kernel": gj.DimensionNumbers((0,)), "bias": gj.DimensionNumbers((0,))}},
    "readout": None,
}


def scanned_user_model(layers=4, dtype=jnp.float32):
    """(model, params, loss): the `gj.ScannedModel`, its params, and the whole model's loss
    ``(params, batch) -> scalar`` for the standard step (batch: {"x": (b, 12), "y": (b, 3)})."""

    def embed(p, batch):
        return jnp.tanh(batch["x"] @ p["encoder"])

    def layer(p, x):
        return x + jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"])

    def head(p, x, batch):
        return jnp.mean((x @ p["readout"] - batch["y"]) ** 2)

    model = gj.ScannedModel(
        embed, layer, head, layers_key="trunk", before=("encoder",), after=("readout",)
    )
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {
        "encoder": jax.random.normal(k[0], (12, 24), dtype) / 3,
        "trunk": {
            "dense": {
                "kernel": jax.random.normal(k[1], (layers, 24, 24), dtype) / 5,
                "bias": jnp.zeros((layers, 24), dtype),
            }
        },
        "readout": jax.random.normal(k[2], (24, 3), dtype) / 5,
    }

    def loss(params, batch):
        x = embed({"encoder": params["encoder"]}, batch)
        x, _ = jax.lax.scan(lambda x, p: (layer(p, x), None), x, params["trunk"])
        return head({"readout": params["readout"]}, x, batch)

    return model, params, loss
