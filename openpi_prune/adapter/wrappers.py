"""The wrappers: each calls OpenPI's original and hands its result over (the prefix to `prefix`,
parameters to `checkpoints`). A result OpenPI now gives in another form raises `Drifted`, which
the install guard turns into an error (strict) or OpenPI's own result."""

import inspect

from openpi_prune import call, settings, telemetry
from openpi_prune.adapter import checkpoints, prefix, pytorch, siglip, training
from openpi_prune.adapter.patches import Drifted, bind
from openpi_prune.pruner import pipeline

# Offset folded into compute_loss's rng for the pruner's own noise: OpenPI splits the rng in three
# and never folds it, so this draws nothing OpenPI uses.
_PRUNER_RNG_FOLD = 0x5052554E


def _describe(value) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}"
    shape = getattr(value, "shape", None)
    return f"an array of shape {tuple(shape)}" if shape is not None else f"a {type(value).__name__}"


def wrap_init(wrapped, instance, args, kwargs):
    wrapped(*args, **kwargs)
    bound = bind(wrapped, args, kwargs)
    checkpoints.init_model(instance, bound["config"], bound["rngs"])


def wrap_embed_prefix(wrapped, instance, args, kwargs):
    observation = prefix.observation_for_prefix(bind(wrapped, args, kwargs)["obs"])
    state = call.current()
    if settings.active().siglip_layer is not None and (state is None or state.probe is None):
        return siglip.embed_prefix(
            wrapped, observation, lambda *result: prefix.pruned_prefix(instance, observation, *result)
        )
    result = wrapped(observation)
    if not (isinstance(result, tuple) and len(result) == 3 and getattr(result[0], "ndim", None) == 3):
        raise Drifted(f"returned {_describe(result)} (expected tokens [b,s,d], input_mask, ar_mask)", result)
    return prefix.prune(instance, observation, *result)


def wrap_make_attn_mask(wrapped, instance, args, kwargs):
    attn_mask = wrapped(*args, **kwargs)
    if getattr(attn_mask, "ndim", None) != 3:
        raise Drifted(f"returned {_describe(attn_mask)} (expected a mask [b,q,k])", attn_mask)
    bound = bind(wrapped, args, kwargs)
    return prefix.adjust_attn_mask(attn_mask, bound["input_mask"], bound["mask_ar"])


def flow_draws(rng, actions):
    """The noise `[b, ah, ad]` and time `[b]` that OpenPI's `compute_loss(rng, ..., actions)` draws
    (checked against its source at install)."""
    import jax

    _, noise_rng, time_rng = jax.random.split(rng, 3)
    noise = jax.random.normal(noise_rng, actions.shape)
    time = jax.random.beta(time_rng, 1.5, 1, actions.shape[:-2]) * 0.999 + 0.001
    return noise, time


def wrap_compute_loss(wrapped, instance, args, kwargs):
    import jax

    state = call.current()
    if state is not None and state.probe is not None:  # a saliency pass wants the unpruned loss
        return wrapped(*args, **kwargs)
    bound = bind(wrapped, args, kwargs)
    rng, actions = bound["rng"], bound["actions"]
    noise, time = flow_draws(rng, actions)
    time_expanded = time[..., None, None]
    x_t = time_expanded * noise + (1 - time_expanded) * actions
    rng_for_pruner = jax.random.fold_in(rng, _PRUNER_RNG_FOLD)
    if bool(bound.get("train", False)):  # schedules, saliency, the compact pass after the ramp
        loss, extra = training.loss(wrapped, instance, args, kwargs, x_t, time, rng_for_pruner)
    else:
        with call.noisy_actions(x_t, time, rng=rng_for_pruner) as this_call:
            loss = wrapped(*args, **kwargs)
        extra = this_call.extra_loss
    if getattr(loss, "shape", ())[:1] != actions.shape[:1]:
        raise Drifted(f"returned {_describe(loss)} (expected a loss per sample, [b, ...])", loss)
    # The pruner's loss is per sample; OpenPI's is per sample and action step.
    if extra is not None:
        loss = loss + extra.reshape(extra.shape + (1,) * (loss.ndim - extra.ndim)).astype(loss.dtype)
    return loss


def wrap_sample_actions(wrapped, instance, args, kwargs):
    import jax
    import jax.numpy as jnp

    bound = bind(wrapped, args, kwargs)
    noise = bound.get("noise")
    if noise is None:
        batch_size = bound["observation"].state.shape[0]
        noise = jax.random.normal(bound["rng"], (batch_size, instance.action_horizon, instance.action_dim))
        kwargs = {**kwargs, "noise": noise}
    time = jnp.ones(noise.shape[:1], dtype=jnp.float32)
    with call.scope(noisy_actions=noise, time=time, rng=None, train=False, saliency=None) as this_call:
        if this_call.served is None:
            return wrapped(*args, **kwargs)
        # Traced for a served call: its telemetry leaves the compiled call with the actions.
        with telemetry.returned() as reports:
            actions = wrapped(*args, **kwargs)
    if not reports:
        return actions
    description, values = reports[-1]  # the prefix the actions were denoised against
    return prefix.Carried(actions, values, description)


def wrap_llm_call(wrapped, instance, args, kwargs):
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    positions = prefix.upstream_positions(bound.arguments["embedded"], bound.arguments["positions"])
    if positions is None:
        return wrapped(*args, **kwargs)
    bound.arguments["positions"] = positions
    return wrapped(*bound.args, **bound.kwargs)


def wrap_policy_infer(wrapped, instance, args, kwargs):
    """`Policy.infer`: its compiled `sample_actions` gets the prompt cut to a bucket, and the response
    carries this call's pruning figures under "pruning"."""
    sample = vars(instance).get("_sample_actions")
    if sample is not None and not isinstance(sample, _ServedSampler):
        instance._sample_actions = _ServedSampler(sample)
    # OpenPI's PyTorch model leaves its figures on the model (`adapter.pytorch`).
    torch_model = vars(instance).get("_model") if vars(instance).get("_is_pytorch_model") else None
    if torch_model is not None:
        pytorch.check_built_patched(torch_model)
        pytorch.take_figures(torch_model)  # none of an earlier call's
    with call.scope(served=call.Served()) as this_call:
        outputs = wrapped(*args, **kwargs)
    if not isinstance(outputs, dict):
        raise Drifted(f"returned {_describe(outputs)} (expected a dict of outputs)", outputs)
    figures = this_call.served.telemetry or (torch_model is not None and pytorch.take_figures(torch_model))
    if figures:  # read after the actions: nothing waits for it
        outputs["pruning"] = prefix.serving_figures(*figures)
    return outputs


class _ServedSampler:
    """A `Policy`'s compiled `sample_actions`, handed the observation with its prompt cut to a
    bucket (compact mode, while pruning is on: a shorter prefix, one compile per bucket). It is
    traced as a served call, so it returns its telemetry with the actions: the actions go on to
    OpenPI, the telemetry to `Policy.infer` (or, called outside it, to the recorder at once)."""

    def __init__(self, sample):
        self.sample = sample

    def __call__(self, rng, observation, **kwargs):
        import jax

        active = settings.active()
        prompt = getattr(observation, "tokenized_prompt", None)
        if settings.is_active() and active.mode == "compact" and isinstance(prompt, jax.Array):
            observation = prefix.bucket_prompt(observation, active.prompt_buckets)
        outer = call.current()
        served = outer.served if outer is not None and outer.served is not None else None
        with call.scope(served=served or call.Served()):
            result = self.sample(rng, observation, **kwargs)
        if not isinstance(result, prefix.Carried):
            return result
        if served is not None:
            served.telemetry = (result.description, result.values)
        else:
            pipeline.report(result.description, jax.device_get(result.values))
        return result.actions


def wrap_siglip_encoder(wrapped, instance, args, kwargs):
    """SigLIP's `Encoder.__call__`: OpenPI's own, or a part of it inside a split `embed_prefix`."""
    state = call.current()
    if state is None or state.siglip is None:
        return wrapped(*args, **kwargs)
    if not instance.scan:
        raise Drifted("SigLIP's encoder is not scanned (its blocks are not stacked)", wrapped(*args, **kwargs))
    return siglip.encoder_part(instance, state.siglip, *args, **kwargs)


def wrap_siglip_variant(wrapped, instance, args, kwargs):
    """`siglip.Module` inside a small model's creation: the variant the block names, not OpenPI's, with
    the block's number of layers where it names one."""
    state = call.current()
    if state is None or state.siglip_variant is None:
        return wrapped(*args, **kwargs)
    depth = {} if state.siglip_depth is None else {"depth": state.siglip_depth}
    return wrapped(*args, **{**kwargs, "variant": state.siglip_variant, **depth})


def wrap_unaugmented(wrapped, instance, args, kwargs):
    """`preprocess_observation` inside the lab's training: the images as at inference."""
    state = call.current()
    if state is None or not state.unaugmented:
        return wrapped(*args, **kwargs)
    return wrapped(*args, **{**kwargs, "train": False})


def wrap_config_load(wrapped, instance, args, kwargs):
    """`BaseModelConfig.load`: give a pi0 checkpoint made without this method its fresh parameters."""
    from openpi.models import pi0_config

    if not isinstance(instance, pi0_config.Pi0Config):
        return wrapped(*args, **kwargs)
    bound = bind(wrapped, args, kwargs)
    params = checkpoints.complete_params(instance, bound["params"])
    return wrapped(params, **{k: v for k, v in bound.items() if k != "params"})


def wrap_checkpoint_load(wrapped, instance, args, kwargs):
    """`CheckpointWeightLoader.load`: treat a method's parameters like LoRA's, kept from `params`."""
    loaded = wrapped(*args, **kwargs)
    if not isinstance(loaded, dict):
        raise Drifted(f"returned {_describe(loaded)} (expected a dict of params)", loaded)
    return checkpoints.add_missing_from_reference(loaded, bind(wrapped, args, kwargs)["params"])
