"""Every patch openpi-prune makes to OpenPI, one row each: the attribute, the signature and the
statements its wrapper relies on (checked before anything is patched), and the wrapper."""

from openpi_prune.adapter import pytorch, wrappers
from openpi_prune.adapter.patches import Patch

PATCHES = (
    Patch("", "make_attn_mask", ("input_mask", "mask_ar"), wrappers.wrap_make_attn_mask),
    Patch("Pi0", "__init__", ("self", "config", "rngs"), wrappers.wrap_init),
    Patch(
        "Pi0",
        "embed_prefix",
        ("self", "obs"),
        wrappers.wrap_embed_prefix,
        # Output layout: every camera's tokens in `obs.images` order, then the prompt's.
        (
            "for name in obs.images:",
            "image_tokens, _ = self.PaliGemma.img(obs.images[name], train=False)",
            'tokenized_inputs = self.PaliGemma.llm(obs.tokenized_prompt, method="embed")',
            "tokens = jnp.concatenate(tokens, axis=1)",
        ),
    ),
    Patch(
        "Pi0",
        "compute_loss",
        ("self", "rng", "observation", "actions", "train"),
        wrappers.wrap_compute_loss,
        # The wrapper re-derives x_t and time from the rng exactly as these lines do.
        (
            "preprocess_rng, noise_rng, time_rng = jax.random.split(rng, 3)",
            "batch_shape = actions.shape[:-2]",
            "noise = jax.random.normal(noise_rng, actions.shape)",
            "time = jax.random.beta(time_rng, 1.5, 1, batch_shape) * 0.999 + 0.001",
            "time_expanded = time[..., None, None]",
            "x_t = time_expanded * noise + (1 - time_expanded) * actions",
            "prefix_tokens, prefix_mask, prefix_ar_mask = self.embed_prefix(observation)",
            "self.embed_suffix(observation, x_t, time)",
        ),
        entry_point=True,
    ),
    Patch(
        "Pi0",
        "sample_actions",
        ("self", "rng", "observation", "num_steps", "noise"),
        wrappers.wrap_sample_actions,
        # The wrapper draws this same noise and passes it in, so the pruner sees what OpenPI uses;
        # `prefix.prefix_pass` repeats the prefix pass (for the bench).
        (
            "observation = _model.preprocess_observation(None, observation, train=False)",
            "batch_size = observation.state.shape[0]",
            "if noise is None:",
            "noise = jax.random.normal(rng, (batch_size, self.action_horizon, self.action_dim))",
            "prefix_tokens, prefix_mask, prefix_ar_mask = self.embed_prefix(observation)",
            "prefix_attn_mask = make_attn_mask(prefix_mask, prefix_ar_mask)",
            "positions = jnp.cumsum(prefix_mask, axis=1) - 1",
            "_, kv_cache = self.PaliGemma.llm([prefix_tokens, None], mask=prefix_attn_mask, positions=positions)",
        ),
        entry_point=True,
    ),
    # OpenPI numbers tokens by `cumsum(input_mask)`, so a pruned prefix would renumber its kept
    # tokens; the wrapper hands PaliGemma the positions they had upstream.
    Patch(
        "Module",
        "__call__",
        ("self", "embedded", "positions", "mask", "adarms_cond", "kv_cache", "deterministic"),
        wrappers.wrap_llm_call,
        ("self.layers(embedded, kv_cache, positions, mask, adarms_cond, deterministic)",),
        module="openpi.models.gemma",
    ),
    # Pruning inside SigLIP (`siglip_layer`): the encoder's blocks in two parts, the patches pruned
    # between them (see `adapter.siglip`).
    Patch(
        "Encoder",
        "__call__",
        ("self", "x", "deterministic"),
        wrappers.wrap_siglip_encoder,
        (
            "x, scan_out = nn.scan(",
            'variable_axes={"params": 0},',
            'name="encoderblock",',
            'return nn.LayerNorm(name="encoder_norm", dtype=self.dtype_mm)(x), out',
        ),
        module="openpi.models.siglip",
    ),
    # Parameters a method adds (named `prune_*`) are absent from checkpoints made without it.
    Patch(
        "BaseModelConfig",
        "load",
        ("self", "params", "remove_extra_params"),
        wrappers.wrap_config_load,
        module="openpi.models.model",
    ),
    Patch(
        "CheckpointWeightLoader",
        "load",
        ("self", "params"),
        wrappers.wrap_checkpoint_load,
        module="openpi.training.weight_loaders",
    ),
    # OpenPI's serving module imports torch and its tokenizer (seconds): patched once a program
    # imports it, and a mismatch there costs the figures, not the pruning.
    Patch(
        "Policy",
        "infer",
        ("self", "obs", "noise"),
        wrappers.wrap_policy_infer,
        module="openpi.policies.policy",
        on_import=True,
    ),
    # OpenPI's PyTorch model (`PI0Pytorch`): patched once a program imports it (torch is slow to
    # import), both or neither; a mismatch fails that import (strict) or leaves PyTorch models unpruned.
    Patch(
        "PI0Pytorch",
        "__init__",
        ("self", "config"),
        pytorch.wrap_init,
        # Sets the rows below on the new model, before `sample_actions` is compiled.
        (
            "self.paligemma_with_expert = PaliGemmaWithExpertModel(",
            "self.sample_actions = torch.compile(self.sample_actions",
        ),
        module="openpi.models_pytorch.pi0_pytorch",
        on_import=True,
    ),
    Patch(
        "PI0Pytorch",
        "embed_prefix",
        ("self", "images", "img_masks", "lang_tokens", "lang_masks"),
        pytorch.wrap_embed_prefix,
        # Output layout: every camera's tokens in order, then the prompt's.
        (
            "for img, img_mask in zip(images, img_masks, strict=True):",
            "embs.append(img_emb)",
            "embs.append(lang_emb)",
            "embs = torch.cat(embs, dim=1)",
        ),
        module="openpi.models_pytorch.pi0_pytorch",
        on_import=True,
        per_instance=True,
    ),
    Patch(
        "PI0Pytorch",
        "forward",
        ("self", "observation", "actions", "noise", "time"),
        pytorch.wrap_forward,
        # The wrapper draws noise and time as these lines do and passes them in (both passes alike).
        (
            "if noise is None:",
            "noise = self.sample_noise(actions.shape, actions.device)",
            "if time is None:",
            "time = self.sample_time(actions.shape[0], actions.device)",
            "self.embed_prefix(images, img_masks, lang_tokens, lang_masks)",
            'return F.mse_loss(u_t, v_t, reduction="none")',
        ),
        module="openpi.models_pytorch.pi0_pytorch",
        on_import=True,
        per_instance=True,
    ),
    # PI0Pytorch calls `self.paligemma_with_expert.forward(...)`, past PyTorch's module hooks.
    Patch(
        "PaliGemmaWithExpertModel",
        "forward",
        ("self", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "use_cache", "adarms_cond"),
        pytorch.wrap_llm_forward,
        module="openpi.models_pytorch.gemma_pytorch",
        on_import=True,
        per_instance=True,
    ),
)
# Made only inside a tool's block (`install.patched`), and seen only by calls inside it.
SMALL_SIGLIP = Patch(
    "", "Module", ("num_classes", "variant", "kw"), wrappers.wrap_siglip_variant, module="openpi.models.siglip"
)
UNAUGMENTED = Patch(
    "",
    "preprocess_observation",
    ("rng", "observation", "train", "image_keys", "image_resolution"),
    wrappers.wrap_unaugmented,
    module="openpi.models.model",
)
# The same for OpenPI's PyTorch model, whose PaliGemma also hard-codes gemma_2b's width.
SMALL_SIGLIP_PYTORCH = Patch(
    "PaliGemmaForConditionalGeneration",
    "__init__",
    ("self", "config"),
    pytorch.wrap_small_siglip,
    module="openpi.models_pytorch.transformers_replace.models.paligemma.modeling_paligemma",
)
TOOLS = (SMALL_SIGLIP, UNAUGMENTED, SMALL_SIGLIP_PYTORCH)
CORE = tuple(p for p in PATCHES if not p.on_import)
SERVING = next(p for p in PATCHES if p.on_import and p.module == "openpi.policies.policy")
PYTORCH = tuple(p for p in PATCHES if p.on_import and p.module.startswith("openpi.models_pytorch."))
# The module whose import makes the PyTorch patches (it imports the others first).
PYTORCH_MODULE = "openpi.models_pytorch.pi0_pytorch"
# Every module a core patch lives in, in the order they are imported.
MODULES = tuple(dict.fromkeys(p.module for p in reversed(CORE)))
