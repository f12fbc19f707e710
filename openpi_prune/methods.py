"""The built-in pruning methods, registered as plugins like any third-party one.

- `scheme_b` (default): the patches vote against the prompt plus the projected noisy actions; the
  projection is a new trainable layer (`Pi0.prune_action_proj`). PaliGemma never sees them.
- `language_only`: the same pruner against the prompt alone: the straight port that collapses.
- `keep_all`: every live patch is kept; the pipeline runs, the output equals OpenPI's.
LightVLA's vote (`LightVLAVote`) scores and selects for all of them unless a plugin overrides it.
"""

import jax.numpy as jnp

from openpi_prune import lightvla
from openpi_prune.errors import PruneInputError
from openpi_prune.hookspecs import hookimpl

PROJECTOR = "prune_action_proj"  # prefix.PARAMETER_PREFIX: loaders fill it in when missing


class LightVLAVote:
    @hookimpl(trylast=True)
    def openpi_prune_score(self, image_tokens, candidate_mask, task_tokens, task_mask, settings):
        return lightvla.vote_scores(image_tokens, task_tokens, task_mask)

    @hookimpl(trylast=True)
    def openpi_prune_select(self, scores, candidate_mask, settings):
        return lightvla.union_of_argmax(scores, candidate_mask)

    @hookimpl(trylast=True)
    def openpi_prune_select_train(self, scores, candidate_mask, image_tokens, noise, settings):
        picked = lightvla.straight_through(scores, candidate_mask, image_tokens, noise)
        return picked, lightvla.union_of_argmax(scores + noise, candidate_mask)


class LanguageOnly:
    name = "language_only"

    @hookimpl
    def openpi_prune_methods(self):
        return [self.name]

    @hookimpl
    def openpi_prune_task_context(self, model, text_tokens, text_mask, noisy_actions, time, settings):
        if settings.method == self.name:
            return text_tokens, text_mask
        return None


class KeepAll(LanguageOnly):
    name = "keep_all"

    @hookimpl
    def openpi_prune_select(self, scores, candidate_mask, settings):
        return candidate_mask if settings.method == self.name else None

    @hookimpl
    def openpi_prune_select_train(self, scores, candidate_mask, image_tokens, noise, settings):
        return (image_tokens, candidate_mask) if settings.method == self.name else None


class SchemeB:
    name = "scheme_b"

    @hookimpl
    def openpi_prune_methods(self):
        return [self.name]

    @hookimpl
    def openpi_prune_init_model(self, model, config, rngs, settings):
        if settings.method != self.name:
            return
        from flax import nnx
        from openpi.models import gemma

        # Noisy action and its flow-matching time in, one task token per action step out, as wide
        # as the prompt's embeddings so that both can be normalised and attended to together.
        width = gemma.get_config(config.paligemma_variant).width
        setattr(model, PROJECTOR, nnx.Linear(config.action_dim + 1, width, rngs=rngs))

    @hookimpl
    def openpi_prune_task_context(self, model, text_tokens, text_mask, noisy_actions, time, settings):
        if settings.method != self.name:
            return None
        projector = getattr(model, PROJECTOR, None)
        if projector is None:
            raise PruneInputError(
                "scheme_b needs the action projector, and this Pi0 has none: it was created before "
                "openpi-prune was enabled with method scheme_b. Enable it first, then create (or "
                "load) the model."
            )
        if noisy_actions is None:
            raise PruneInputError(
                "scheme_b needs the noisy actions, which exist only inside Pi0.compute_loss and "
                "Pi0.sample_actions. To call embed_prefix directly, wrap the call in "
                "`openpi_prune.noisy_actions(x_t, time)`."
            )
        steps = noisy_actions.shape[1]
        time_channel = jnp.broadcast_to(time[:, None, None], (time.shape[0], steps, 1))
        action_tokens = projector(
            jnp.concatenate([noisy_actions, time_channel], axis=-1).astype(projector.kernel.dtype)
        )
        task_tokens = jnp.concatenate([text_tokens, action_tokens.astype(text_tokens.dtype)], axis=1)
        task_mask = jnp.concatenate([text_mask, jnp.ones(action_tokens.shape[:2], dtype=bool)], axis=1)
        return task_tokens, task_mask


BUILTIN = (LightVLAVote(), SchemeB(), LanguageOnly(), KeepAll())
