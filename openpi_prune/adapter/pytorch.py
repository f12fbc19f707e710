"""OpenPI's PyTorch pi0 / pi0.5 (`PI0Pytorch`), seen by the pruner: its parameters added at
`__init__`, its prefix pruned after `embed_prefix`, and PaliGemma handed the positions the kept
tokens had upstream. Patched when a program imports `openpi.models_pytorch.pi0_pytorch`, so that
JAX users never import torch for it.

`PI0Pytorch.__init__` compiles `sample_actions` with `torch.compile`, which traces a class's wrapt
wrapper as the function it wraps: the `__init__` row sets the other rows' wrappers on each new model,
as plain functions that it traces. A model built before openpi-prune was enabled is not pruned, so
enable it first (`OPENPI_PRUNE` does so at start-up). The kept set has a static size (`capacity`
slots): each capacity compiles once.

What the pruned prefix leaves for the rest of the call (its position shift, its figures) is kept on
the model, as PyTorch modules keep buffers: one call at a time per model.
"""

import functools
import inspect
import math
import types
import warnings
import weakref

import numpy as np

from openpi_prune import call, settings
from openpi_prune.adapter import prefix
from openpi_prune.adapter.patches import Drifted, bind
from openpi_prune.errors import PruneInputError, UntrainedParametersWarning
from openpi_prune.hookspecs import PARAMETER_PREFIX
from openpi_prune.pruner import methods, pipeline, torch_pipeline

STEP = PARAMETER_PREFIX + "step"  # the training passes made, a buffer saved with the weights (as JAX's)
# Attributes on the model (and on its PaliGemmaWithExpertModel) for the rest of one call.
_SHIFT = "_openpi_prune_position_shift"
_FIGURES = "_openpi_prune_figures"
# Every model built while patched: `forget` clears what their last pruned call left.
_MODELS = weakref.WeakSet()
ACTIVE = False  # the PyTorch rows are patched (set by `install`)


def wrap_init(wrapped, instance, args, kwargs):
    """After `PI0Pytorch.__init__`: the active method's `prune_*` parameters, a checkpoint without
    them loading with the fresh ones (with a warning), as the JAX model does, and the per-instance
    rows of the table set on the new model."""
    import torch

    from openpi_prune.adapter import table

    wrapped(*args, **kwargs)
    active = settings.active()
    if active.drop_cameras:
        warnings.warn(
            f"drop_cameras={'+'.join(active.drop_cameras)} is not available for OpenPI's PyTorch models yet: "
            "those cameras are encoded and, where the inputs mask them, never kept (what is lost is their "
            "cost, not the pruning).",
            UserWarning,
            stacklevel=4,
        )
    if active.method == "relevance":
        width = instance.paligemma_with_expert.paligemma.config.text_config.hidden_size
        hidden = active.relevance_hidden
        shapes = {
            methods.RELEVANCE_QUERY: (width, methods.RELEVANCE_RANK),
            methods.RELEVANCE_KEY: (hidden or width, methods.RELEVANCE_RANK),
        }
        if hidden:
            shapes[methods.RELEVANCE_HIDDEN_KERNEL] = (2 * width, hidden)
        for name, shape in shapes.items():
            # JAX's lecun_normal: a normal of variance 1 / fan_in, truncated at two deviations.
            std = 1.0 / math.sqrt(shape[0]) / 0.87962566103423978
            weight = torch.empty(shape)
            torch.nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
            instance.register_parameter(name, torch.nn.Parameter(weight))
        if hidden:
            instance.register_parameter(methods.RELEVANCE_HIDDEN_BIAS, torch.nn.Parameter(torch.zeros(hidden)))
    instance.register_buffer(STEP, torch.zeros((), dtype=torch.int64))
    instance.register_load_state_dict_post_hook(_fresh_when_missing)
    setattr(instance.paligemma_with_expert, _SHIFT, None)
    setattr(instance, _FIGURES, None)
    owners = {"PI0Pytorch": instance, "PaliGemmaWithExpertModel": instance.paligemma_with_expert}
    for patch in table.PYTORCH:
        if patch.per_instance:
            target = owners[patch.owner]
            setattr(target, patch.name, functools.partial(_per_instance, patch, getattr(target, patch.name), target))
    _MODELS.add(instance)


def _per_instance(patch, wrapped, instance, *args, **kwargs):
    """A per-instance row's wrapper while openpi-prune is enabled: a plain function reading a module
    flag, which `torch.compile` traces and guards on (disabling recompiles to OpenPI's own)."""
    if not ACTIVE:
        return wrapped(*args, **kwargs)
    try:
        return patch.wrapper(wrapped, instance, args, kwargs)
    except Drifted as drift:
        from openpi_prune.adapter import install

        return install._drifted(patch, drift)


def forget() -> None:
    """On disable: models built while enabled run OpenPI's own again, and nothing their last pruned
    call left is read."""
    global ACTIVE
    ACTIVE = False
    for model in list(_MODELS):
        setattr(model.paligemma_with_expert, _SHIFT, None)
        setattr(model, _FIGURES, None)


def _fresh_when_missing(module, incompatible_keys) -> None:
    missing = sorted(k for k in incompatible_keys.missing_keys if k.startswith(PARAMETER_PREFIX))
    for key in missing:
        incompatible_keys.missing_keys.remove(key)
    missing = [k for k in missing if k != STEP]  # a step missing only starts the schedules from 0
    if not missing:
        return
    warnings.warn(
        f"the checkpoint has no {', '.join(missing)} (it was trained without {settings.active().method}); "
        "pruning with freshly initialised, untrained parameters. Fine-tune with openpi-prune enabled to train them.",
        UntrainedParametersWarning,
        stacklevel=4,
    )


def wrap_embed_prefix(wrapped, instance, args, kwargs):
    """`PI0Pytorch.embed_prefix`: OpenPI's prefix (every camera's tokens, then the prompt's), pruned."""
    import torch

    bound = bind(wrapped, args, kwargs)
    result = wrapped(*args, **kwargs)
    if not (isinstance(result, tuple) and len(result) == 3 and getattr(result[0], "ndim", None) == 3):
        raise Drifted("returned another form (expected embs [b,s,d], pad_masks, att_masks)", result)
    embs, pad_masks, att_masks = result
    active = settings.active()
    torch_pipeline.check_method(active)
    cameras, prompt = len(bound["images"]), bound["lang_tokens"].shape[1]
    n = embs.shape[1] - prompt
    if cameras == 0 or n <= 0 or n % cameras:
        raise Drifted(f"gave {embs.shape[1]} tokens for {cameras} camera(s) and a {prompt}-token prompt", result)
    # Training only (not compiled): the call state of `wrap_forward`.
    state = call.current() if instance.training else None
    if state is not None and state.probe is not None:  # the saliency pass: unpruned, image tokens perturbed
        state.probe.delta = torch.zeros_like(embs[:, :n], requires_grad=True)
        state.probe.image_tokens = embs[:, :n].detach()
        setattr(instance.paligemma_with_expert, _SHIFT, None)
        return torch.cat([embs[:, :n] + state.probe.delta, embs[:, n:]], dim=1), pad_masks, att_masks
    training = None
    if state is not None and state.train:
        training = torch_pipeline.Training(state.keep_fraction, state.saliency, compact=state.train_compact)
    parameters = {name: p for name, p in instance.named_parameters(recurse=False) if name.startswith(PARAMETER_PREFIX)}
    pruned = torch_pipeline.prune(
        parameters,
        image_tokens=embs[:, :n],
        text_tokens=embs[:, n:],
        candidate_mask=pad_masks[:, :n],
        text_mask=pad_masks[:, n:],
        att_mask=att_masks,
        per_camera=n // cameras,
        settings=active,
        training=training,
    )
    if pruned.distill_loss is not None:
        state.extra_loss = pruned.distill_loss
    shift = None
    if active.keep_positions:
        upstream = torch.gather(torch.cumsum(pad_masks, dim=1), 1, pruned.slot_source)
        after = torch.sum(pad_masks, dim=1) - torch.sum(pruned.pad_mask, dim=1)
        shift = (upstream - torch.cumsum(pruned.pad_mask, dim=1), after)
    setattr(instance.paligemma_with_expert, _SHIFT, shift)
    description = dict(
        method=active.method,
        mode=active.mode,
        capacity=pruned.pad_mask.shape[1] - prompt,
        warn_below=active.warn_below,
        log_every=active.log_every,
    )
    setattr(instance, _FIGURES, (description, pruned.values))
    return pruned.tokens, pruned.pad_mask, pruned.att_mask


def wrap_forward(wrapped, instance, args, kwargs):
    """`PI0Pytorch.forward` (OpenPI's training loss) in training mode: the settings' ramp counted by
    the model's own step, the model's saliency on every `saliency_every`-th step for a method that
    learns from it, the pruned pass (full length during the ramp, compact after it), and the head's
    distillation loss added to OpenPI's per-sample loss."""
    import torch

    if not instance.training:
        return wrapped(*args, **kwargs)
    active = settings.active()
    bound = bind(wrapped, args, kwargs)
    observation, actions = bound["observation"], bound["actions"]
    # Drawn as OpenPI's forward draws them, once, so that both passes see the same x_t.
    noise = bound.get("noise")
    noise = instance.sample_noise(actions.shape, actions.device) if noise is None else noise
    time = bound.get("time")
    time = instance.sample_time(actions.shape[0], actions.device) if time is None else time
    counter = getattr(instance, STEP)
    step = int(counter)
    fraction = active.keep_fraction
    if active.keep_ramp_steps:
        fraction = float(call.gradual_keep_fraction(step, active.keep_ramp_steps, active.keep_fraction))
    saliency = None
    if prefix.wants_saliency() and step % active.saliency_every == 0:
        saliency = _saliency(wrapped, observation, actions, noise, time, active.saliency_share)
    compact = bool(active.compact_training) and fraction <= active.keep_fraction
    with call.scope(train=True, saliency=saliency, keep_fraction=fraction, train_compact=compact) as this:
        loss = wrapped(observation, actions, noise=noise, time=time)
    with torch.no_grad():
        counter.add_(1)
    figures = getattr(instance, _FIGURES, None)
    if figures is not None and active.telemetry:  # to the hooks, and a line in the training log
        description, values = _on_host(figures)
        values["training_step"] = np.full(values["kept"].shape, step)
        pipeline.report({**description, "mode": "train"}, values)
    if this.extra_loss is None:
        return loss
    return loss + this.extra_loss.reshape(-1, *(1,) * (loss.ndim - 1)).to(loss.dtype)


def _saliency(wrapped, observation, actions, noise, time, share: float):
    """`[b, image tokens]`: the model's saliency (`settings.saliency`) of each image token, from the
    gradient of OpenPI's unpruned loss at it, of the batch's first `share` (zeros elsewhere). Its
    random draws (the image augmentation) are given back, so that the pruned pass makes the same."""
    import jax
    import torch

    from openpi_prune.pruner import torch_ops

    batch = actions.shape[0]
    n = math.ceil(share * batch)
    if n < batch:
        observation, actions, noise, time = jax.tree.map(lambda x: x[:n], (observation, actions, noise, time))
    probe = types.SimpleNamespace(delta=None)
    devices = [actions.device] if actions.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), call.scope(probe=probe):
        loss = wrapped(observation, actions, noise=noise, time=time)
        (grad,) = torch.autograd.grad(loss.float().sum(), probe.delta)
    saliency = torch_ops.saliency(grad, probe.image_tokens, settings.active().saliency).detach()
    return torch.cat([saliency, saliency.new_zeros((batch - n, *saliency.shape[1:]))]) if n < batch else saliency


def wrap_llm_forward(wrapped, instance, args, kwargs):
    """`PaliGemmaWithExpertModel.forward` after a pruned prefix: OpenPI numbers tokens by
    `cumsum(pad_masks)`, which would renumber the kept ones; PaliGemma gets their upstream positions.
    Only for the prefix the shift was made for (its length), e.g. not for one built unpatched."""
    import torch

    shift = getattr(instance, _SHIFT, None)
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    embeds, positions = bound.arguments.get("inputs_embeds"), bound.arguments.get("position_ids")
    if shift is None or embeds is None or positions is None:
        return wrapped(*args, **kwargs)
    prefix_shift, after = shift
    if embeds[0] is None:  # the suffix alone, against the cached prefix
        if bound.arguments["attention_mask"].shape[-1] - embeds[1].shape[1] != prefix_shift.shape[1]:
            return wrapped(*args, **kwargs)
        moved = positions + after[:, None]
    else:
        if embeds[0].shape[:2] != prefix_shift.shape:
            return wrapped(*args, **kwargs)
        rest = positions.shape[1] - prefix_shift.shape[1]
        moved = positions + torch.cat([prefix_shift, after[:, None].expand(-1, rest)], dim=1)
    bound.arguments["position_ids"] = moved
    return wrapped(*bound.args, **bound.kwargs)


def check_built_patched(model) -> None:
    """A `PI0Pytorch` built before openpi-prune was enabled has none of its wrappers: say so, rather
    than serve it unpruned while pruning is on."""
    if model not in _MODELS:
        raise PruneInputError(
            "this PI0Pytorch was built before openpi-prune was enabled, so it would run unpruned: its "
            "wrappers and the method's parameters are set when the model is built. Enable openpi-prune "
            "first (OPENPI_PRUNE at start-up, openpi_prune.enable(), or a `_prune` twin config), then "
            "build or load the model and its Policy."
        )


def take_figures(model):
    """(description, telemetry values as numpy) of the prefix `model` pruned last, once; or None."""
    figures = getattr(model, _FIGURES, None)
    setattr(model, _FIGURES, None)
    return None if figures is None else _on_host(figures)


def _on_host(figures):
    description, values = figures
    return description, {k: v.detach().cpu().numpy() for k, v in values.items()}


def wrap_small_siglip(wrapped, instance, args, kwargs):
    """PaliGemma's `__init__` inside a small model's creation (`table.SMALL_SIGLIP_PYTORCH`): the SigLIP
    variant the block names, projected to the language model's width (OpenPI fixes 2048, gemma_2b's)."""
    from openpi.models import siglip

    from openpi_prune import call

    state = call.current()
    config = bind(wrapped, args, kwargs)["config"]
    if state is not None and state.siglip_variant is not None:
        shape = siglip.decode_variant(state.siglip_variant)
        vision = config.vision_config
        vision.hidden_size, vision.num_hidden_layers = shape["width"], shape["depth"]
        vision.intermediate_size, vision.num_attention_heads = shape["mlp_dim"], shape["num_heads"]
        vision.patch_size = shape.get("patch_size", (vision.patch_size,))[0]
        vision.projection_dim = config.text_config.hidden_size
    return wrapped(*args, **kwargs)
