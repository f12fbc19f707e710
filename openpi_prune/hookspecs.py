"""The decisions a pruning method makes, as pluggy hooks.

Built-in methods (`openpi_prune.pruner.methods`) implement these through the same plugin manager as
third-party plugins, which are found in the `openpi_prune` entry-point group. A method-specific
implementation returns None unless `settings.method` names its method. Array arguments are JAX
arrays, traced when the model is jitted: implementations must be `jax.numpy` code.
"""

import pluggy

NAME = "openpi_prune"
hookspec = pluggy.HookspecMarker(NAME)
hookimpl = pluggy.HookimplMarker(NAME)
# Parameters a method adds to `Pi0` are named so; loaders fill them in like OpenPI's LoRA weights.
PARAMETER_PREFIX = "prune_"


class PruneSpec:
    @hookspec
    def openpi_prune_methods(self):
        """Names of the pruning methods this plugin provides, as a list of str."""

    @hookspec
    def openpi_prune_init_model(self, model, config, rngs, settings):
        """Add the method's trainable parameters to a newly created `Pi0` (e.g. a projector).

        Called after OpenPI's own `Pi0.__init__`, with its config and `nnx.Rngs`. Name what you
        add `prune_*`: checkpoints made without your method lack it, and OpenPI's loaders
        (`BaseModelConfig.load`, `CheckpointWeightLoader`) then keep the fresh values.
        """

    @hookspec(firstresult=True)
    def openpi_prune_task_context(self, model, text_tokens, text_mask, noisy_actions, time, settings):
        """Build the tokens the patches vote against: `(task_tokens [b,t,d], task_mask [b,t])`.

        `text_tokens`/`text_mask` are the prompt's embeddings and mask as `embed_prefix` made them;
        `noisy_actions [b,h,a]` and `time [b]` are the flow-matching input of this call (`x_t` in
        training, the initial noise at time 1 in `sample_actions`), or None outside those calls.
        """

    @hookspec(firstresult=True)
    def openpi_prune_prefix_extension(self, model, task_tokens, task_mask, settings):
        """Tokens to append to the prefix `[b,e,d]`, hidden from PaliGemma, or None (the default).

        They enter with `input_mask` False, so no prefix or suffix token attends to them and the
        positions of every other token are unchanged (OpenPI's positions are `cumsum(input_mask)`).
        Scheme A puts its noisy-action placeholders here.
        """

    @hookspec(firstresult=True)
    def openpi_prune_score(self, model, image_tokens, candidate_mask, task_tokens, task_mask, settings):
        """Score the patches: a vote `[b,n,n]` (row i's preference for keeping patch j), or a
        relevance `[b,n]` per patch (`model` holds the method's parameters).

        `image_tokens` and `task_tokens` come prepared by `settings.scoring` (`lightvla.prepare`:
        as they are, centred, or robustly standardised per dimension).
        """

    @hookspec(firstresult=True)
    def openpi_prune_capacity(self, image_tokens, settings):
        """Image-token slots of a compact prefix when `settings.capacity` is unset: an int that holds
        every patch the method can keep out of `image_tokens`, or None (64 per camera)."""

    @hookspec(firstresult=True)
    def openpi_prune_select(self, scores, candidate_mask, settings):
        """The kept set at inference, `kept_mask [b,n]` (a subset of `candidate_mask`)."""

    @hookspec(firstresult=True)
    def openpi_prune_select_train(self, scores, candidate_mask, image_tokens, noise, saliency, keep_fraction, settings):
        """The image tokens a training forward pass sees: `(image_tokens [b,n,d], kept_mask [b,n])`.

        Same length as the input, and differentiable with respect to `scores`, so the loss trains
        whatever made them. `noise` (shaped like `scores`) is the method's exploration noise for this
        step. `saliency [b,n]` is the model's saliency this step (see `openpi_prune_wants_saliency`),
        or None. `keep_fraction` is the share to keep this step, for a method that keeps a share:
        `settings.keep_fraction`, or a training schedule's value (`openpi_prune.keep_fraction`; may be
        traced). A third element, `[b,n]` bool, hides the patches where it is False from PaliGemma
        in this pass (default: every candidate stays visible).
        """

    @hookspec(firstresult=True)
    def openpi_prune_wants_saliency(self, settings):
        """True if the method learns from the model's saliency (`openpi_prune_distill_loss`).

        Each training step then also runs the unpruned model once and takes the gradient of its loss
        with respect to every image token; that costs about one more forward and backward pass.
        """

    @hookspec(firstresult=True)
    def openpi_prune_distill_loss(self, scores, saliency, candidate_mask, settings):
        """A per-sample loss `[b]` added to `compute_loss` in training, or None.

        `saliency [b,n]` is the norm of the unpruned loss's gradient at each image token (no
        gradient flows into it): which patches the model itself uses, without labels.
        """

    @hookspec(firstresult=True)
    def openpi_prune_attn_mask(self, attn_mask, input_mask, mask_ar, settings):
        """Adjust the mask OpenPI's `make_attn_mask` built (`[b,q,k]`), or return None to keep it.

        Called for every mask `Pi0.compute_loss` / `sample_actions` build with `make_attn_mask`.
        (In `sample_actions` the suffix-to-prefix block is built from the prefix's `input_mask`
        directly, so a token pruned from that mask is hidden from the suffix as well.)
        """

    @hookspec
    def openpi_prune_report(self, telemetry):
        """Receive the `Telemetry` of one pruned prefix, on the host, as numpy arrays.

        Called on openpi-prune's telemetry thread, in order, after the model call that made it may
        have returned (`openpi_prune.telemetry.flush()` waits for delivery); an exception is logged
        and skipped."""
