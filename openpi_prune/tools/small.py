"""Small real OpenPI models and inputs, for the demo, the benchmark and the tests.

They are upstream `Pi0` instances with OpenPI's `dummy` Gemma and, by default, SigLIP `mu/14`
instead of the hard-coded `So400m/14`: still 256 tokens per 224x224 image, but ~17M parameters
that create in seconds on a CPU. No weights are downloaded.
"""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@contextlib.contextmanager
def siglip_variant(variant: str | None, depth: int | None = None):
    """Make `Pi0.__init__` build SigLIP `variant` inside the block (None: OpenPI's own So400m/14), with
    `depth` layers instead of the variant's own where given."""
    from openpi_prune.adapter import install, table

    if variant is None:
        yield
        return
    with install.patched(table.SMALL_SIGLIP, siglip_variant=variant, siglip_depth=depth):
        yield


def config(*, pi05: bool = True, action_horizon: int = 10, max_token_len: int = 32, **changes):
    """A `Pi0Config` with OpenPI's `dummy` Gemma for both experts, in float32 (any field may be changed)."""
    from openpi.models import pi0_config

    fields = dict(
        paligemma_variant="dummy",
        action_expert_variant="dummy",
        dtype="float32",
        pi05=pi05,
        action_horizon=action_horizon,
        max_token_len=max_token_len,
    )
    return pi0_config.Pi0Config(**{**fields, **changes})


def create(
    model_config, *, seed: int = 0, siglip: str | None = "mu/14", perturb: bool = True, siglip_depth: int | None = None
):
    """A real `Pi0`. OpenPI zero-initialises some kernels (SigLIP's head, pi0.5's adaRMS
    modulation), so a fresh model's image tokens are all zero and its actions ignore the
    observation; `perturb` gives every all-zero kernel random weights, so there is something to
    prune by and pruning shows in the actions."""
    with siglip_variant(siglip, siglip_depth):
        model = model_config.create(jax.random.key(seed))
    if perturb:
        params = get_params(model)
        key = jax.random.key(seed + 1)
        for path, value in params.items():
            if path[-1] == "kernel" and not bool(jnp.any(value)):
                key, draw = jax.random.split(key)
                params[path] = jax.random.normal(draw, value.shape, value.dtype) / jnp.sqrt(value.shape[-2])
        set_params(model, params)
    return model


def create_pytorch(model_config, *, seed: int = 0, siglip: str | None = "mu/14"):
    """A real `PI0Pytorch` (OpenPI's PyTorch model) of `model_config`, in float32, SigLIP `siglip`
    projected to the language model's width (None: OpenPI's So400m/14, which needs gemma_2b)."""
    import torch
    from openpi.models_pytorch import pi0_pytorch

    from openpi_prune.adapter import install, table

    torch.manual_seed(seed)
    block = install.patched(table.SMALL_SIGLIP_PYTORCH, siglip_variant=siglip) if siglip else contextlib.nullcontext()
    with block:
        model = pi0_pytorch.PI0Pytorch(model_config)
    # As `create`'s perturb: OpenPI's zero-initialised layers would leave the images unused.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2 and not bool(parameter.any()):
                parameter.normal_(0.0, parameter.shape[-1] ** -0.5)
    return model.eval()


def copy_prefix_weights(jax_model, torch_model) -> None:
    """Give `torch_model` (a `PI0Pytorch`) the weights of `jax_model` (a `Pi0` of the same config) that
    make the prefix and choose what is kept: SigLIP, its projection, the token embeddings and the
    pruner's `prune_*` parameters (each layout turned as OpenPI's JAX-to-PyTorch conversion turns it).
    The rest (PaliGemma's layers, the action expert) is left as it is: it does not touch the kept set."""
    import torch

    params = {"/".join(map(str, k)): np.asarray(v, np.float32) for k, v in get_params(jax_model).items()}
    img, vision = "PaliGemma/img/", "paligemma_with_expert.paligemma.model.vision_tower.vision_model."
    block = img + "Transformer/encoderblock/"
    heads_out = lambda w: w.reshape(w.shape[0], -1).T  # noqa: E731  [d, heads, hd] -> [heads*hd, d]
    new = {
        vision + "embeddings.patch_embedding.weight": params[img + "embedding/kernel"].transpose(3, 2, 0, 1),
        vision + "embeddings.patch_embedding.bias": params[img + "embedding/bias"],
        vision + "embeddings.position_embedding.weight": params[img + "pos_embedding"][0],
        vision + "post_layernorm.weight": params[img + "Transformer/encoder_norm/scale"],
        vision + "post_layernorm.bias": params[img + "Transformer/encoder_norm/bias"],
        "paligemma_with_expert.paligemma.model.multi_modal_projector.linear.weight": params[img + "head/kernel"].T,
        "paligemma_with_expert.paligemma.model.multi_modal_projector.linear.bias": params[img + "head/bias"],
        "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight": params[
            "PaliGemma/llm/embedder/input_embedding"
        ],
    }
    attention = block + "MultiHeadDotProductAttention_0/"
    for layer in range(params[block + "LayerNorm_0/scale"].shape[0]):
        at = f"{vision}encoder.layers.{layer}."
        for jax_name, torch_name in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
            new[at + torch_name + ".weight"] = params[f"{block}{jax_name}/scale"][layer]
            new[at + torch_name + ".bias"] = params[f"{block}{jax_name}/bias"][layer]
        for jax_name, torch_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            new[at + f"self_attn.{torch_name}.weight"] = heads_out(params[f"{attention}{jax_name}/kernel"][layer])
            new[at + f"self_attn.{torch_name}.bias"] = params[f"{attention}{jax_name}/bias"][layer].reshape(-1)
        out = params[attention + "out/kernel"][layer]  # [heads, hd, d]
        new[at + "self_attn.out_proj.weight"] = out.reshape(-1, out.shape[-1]).T
        new[at + "self_attn.out_proj.bias"] = params[attention + "out/bias"][layer]
        for jax_name, torch_name in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            new[at + f"mlp.{torch_name}.weight"] = params[f"{block}MlpBlock_0/{jax_name}/kernel"][layer].T
            new[at + f"mlp.{torch_name}.bias"] = params[f"{block}MlpBlock_0/{jax_name}/bias"][layer]
    new |= {name: value for name, value in params.items() if name.startswith("prune_")}
    state = torch_model.state_dict()
    for name, value in new.items():
        if tuple(state[name].shape) != value.shape:
            raise ValueError(
                f"{name}: the JAX weight has shape {value.shape}, the PyTorch one {tuple(state[name].shape)}"
            )
    torch_model.load_state_dict(
        {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in new.items()}, strict=False
    )


def torch_observation(observation):
    """A JAX `Observation` (as `observation` makes) with torch tensors, images channels-first, as
    OpenPI's `Observation.from_dict` hands them to its PyTorch model."""
    import torch

    converted = jax.tree.map(lambda x: torch.from_numpy(np.array(x)), observation)
    images = {name: image.permute(0, 3, 1, 2) for name, image in converted.images.items()}
    return dataclasses.replace(converted, images=images)


def get_params(model) -> dict[tuple, jax.Array]:
    """The model's parameters by path, e.g. `("PaliGemma", "img", "head", "bias")`."""
    from flax import traverse_util

    state = nnx.state(model, nnx.Param)
    pure = state.to_pure_dict() if hasattr(state, "to_pure_dict") else nnx.to_pure_dict(state)
    return traverse_util.flatten_dict(pure)


def set_params(model, params: dict[tuple, jax.Array]) -> None:
    """Write parameters by path (as `get_params` gives them) back into the model."""
    from flax import traverse_util

    state = nnx.state(model, nnx.Param)
    pure = traverse_util.unflatten_dict(params)
    if hasattr(state, "replace_by_pure_dict"):
        state.replace_by_pure_dict(pure)
    else:  # newer flax
        nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def observation(
    model_config,
    *,
    batch_size: int = 1,
    seed: int = 0,
    prompt_tokens: int | list[int] = 12,
    camera_masks: dict[str, list[bool]] | None = None,
):
    """A random observation: smooth random images in [-1, 1], a random prompt of `prompt_tokens`
    live tokens (per sample if a list) padded to `max_token_len`, all cameras live unless masked."""
    from openpi.models import model as _model

    rng = np.random.default_rng(seed)
    spec, _ = model_config.inputs_spec(batch_size=batch_size)
    images, masks = {}, {}
    for name in spec.images:
        coarse = rng.uniform(-1, 1, (batch_size, 14, 14, 3))
        images[name] = jnp.asarray(np.repeat(np.repeat(coarse, 16, axis=1), 16, axis=2), jnp.float32)
        live = (camera_masks or {}).get(name, [True] * batch_size)
        masks[name] = jnp.asarray(live, dtype=bool)
    lengths = prompt_tokens if isinstance(prompt_tokens, list) else [prompt_tokens] * batch_size
    width = model_config.max_token_len
    tokens = rng.integers(2, 250_000, (batch_size, width))
    prompt_mask = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
    return _model.Observation(
        images=images,
        image_masks=masks,
        state=jnp.asarray(rng.normal(size=(batch_size, model_config.action_dim)), jnp.float32),
        tokenized_prompt=jnp.asarray(np.where(prompt_mask, tokens, 0), jnp.int32),
        tokenized_prompt_mask=jnp.asarray(prompt_mask),
    )


def actions(model_config, *, batch_size: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed + 7)
    shape = (batch_size, model_config.action_horizon, model_config.action_dim)
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def parameter_count(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))


def add_shared_component(model, *, scale: float = 2.0, seed: int = 0) -> None:
    """Give every image token and every prompt token one shared direction, `scale` times their RMS.

    Trained transformer embeddings share such a component (anisotropy); on random weights this
    reproduces the collapse a straight LightVLA port shows on pi0.5 (see the README).
    """
    params = get_params(model)
    bias, table = ("PaliGemma", "img", "head", "bias"), ("PaliGemma", "llm", "embedder", "input_embedding")
    width = params[bias].shape[-1]
    direction = jax.random.normal(jax.random.key(seed), (width,))
    direction = direction / jnp.sqrt(jnp.mean(jnp.square(direction)))  # RMS 1
    # Image tokens: head(x) = x @ kernel + bias; their RMS is measured on a random image batch.
    image = jax.random.uniform(jax.random.key(seed + 1), (1, 224, 224, 3), minval=-1, maxval=1)
    tokens, _ = model.PaliGemma.img(image, train=False)
    params[bias] = params[bias] + scale * jnp.sqrt(jnp.mean(jnp.square(tokens))) * direction
    rows = params[table]
    params[table] = rows + scale * jnp.sqrt(jnp.mean(jnp.square(rows))) * direction.astype(rows.dtype)
    set_params(model, params)


def add_outlier_dimensions(model, *, dims: int = 4, scale: float = 100.0, wobble: float = 0.1, seed: int = 0) -> None:
    """Give every image and prompt token a few huge dimensions, as trained ViTs and LLMs show
    ("massive activations"): `scale` times the tokens' RMS, varying by `wobble` of that between tokens.

    Centring removes the constant part but not the variation, which still outweighs every other
    dimension after the weight-free RMS norm.
    """
    params = get_params(model)
    kernel, bias = ("PaliGemma", "img", "head", "kernel"), ("PaliGemma", "img", "head", "bias")
    table = ("PaliGemma", "llm", "embedder", "input_embedding")
    chosen = jax.random.choice(jax.random.key(seed), params[bias].shape[-1], (dims,), replace=False)
    image = jax.random.uniform(jax.random.key(seed + 1), (1, 224, 224, 3), minval=-1, maxval=1)
    tokens, _ = model.PaliGemma.img(image, train=False)
    rms = jnp.sqrt(jnp.mean(jnp.square(tokens)))
    std = jnp.maximum(jnp.std(tokens[..., chosen], axis=(0, 1)), 1e-6)
    params[kernel] = params[kernel].at[:, chosen].multiply(wobble * scale * rms / std)
    params[bias] = params[bias].at[chosen].add(scale * rms)
    rows = params[table]
    row_rms = jnp.sqrt(jnp.mean(jnp.square(rows)))
    noise = jax.random.normal(jax.random.key(seed + 2), (rows.shape[0], dims))
    params[table] = rows.at[:, chosen].add((scale * row_rms * (1 + wobble * noise)).astype(rows.dtype))
    set_params(model, params)
