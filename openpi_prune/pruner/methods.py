"""The built-in pruning methods, registered as plugins like any third-party one.

Each method decides the task tokens the patches vote against:
- `language_only`: the prompt alone, as LightVLA's released recipe (its action positions are zeros).
- `scheme_b`: the prompt plus the projected noisy actions (`Pi0.prune_action_proj`, action + time
  in); PaliGemma never sees them.
- `scheme_a`: the same task tokens as `scheme_b` (and the same projector), but the action tokens
  are also appended to the prefix as placeholders, hidden from PaliGemma's attention.
- `action_queries`: the prompt plus learned query tokens (`Pi0.prune_action_queries`, one per
  action step), the same in training and at inference, unlike noisy actions.
- `relevance`: no vote; a learned head (`Pi0.prune_relevance_*`) scores each patch against the
  prompt and the `keep_fraction` most relevant are kept. In training it learns to reproduce the
  model's own saliency, and the model is fine-tuned on the same share of patches, those the head
  picks (`train_picks`).
- `keep_all`: every live patch is kept; the pipeline runs, the output equals OpenPI's.
- `random` and `distinct`: prompt-blind baselines that keep the same share as `relevance`, a
  random one (drawn anew for every image) or the patches least like the rest of their image (the
  norm of the patch as `settings.scoring` prepares it: contrast, whatever the prompt asks for). A
  learned head earns its place only where it beats them.
LightVLA's vote (`LightVLAVote`) scores and selects for all of them unless a plugin overrides it,
on tokens prepared by `settings.scoring`.
"""

import math

import jax
import jax.numpy as jnp

from openpi_prune.errors import PruneInputError
from openpi_prune.hookspecs import hookimpl
from openpi_prune.pruner import lightvla, relevance

# prefix.PARAMETER_PREFIX: loaders fill these in when a checkpoint lacks them.
PROJECTOR = "prune_action_proj"
QUERIES = "prune_action_queries"
RELEVANCE_QUERY, RELEVANCE_KEY = "prune_relevance_query", "prune_relevance_key"
# With settings.relevance_hidden: the hidden layer before the key (relevance.hidden_features).
RELEVANCE_HIDDEN_KERNEL, RELEVANCE_HIDDEN_BIAS = "prune_relevance_hidden_kernel", "prune_relevance_hidden_bias"
RELEVANCE_RANK = 64


def check_relevance_hidden(made_with: int, settings, model_class: str) -> None:
    """A head runs under the `relevance_hidden` it was made with (its key reads that width)."""
    if made_with != settings.relevance_hidden:
        raise PruneInputError(
            f"relevance_hidden is {settings.relevance_hidden}, and this {model_class}'s head was made with "
            f"relevance_hidden={made_with}: set it to what the model was created (and trained) with, or "
            "create the model again under this setting."
        )


def _append(text_tokens, text_mask, extra):
    """The prompt's tokens followed by `extra` `[b,k,d]` task tokens, all of them live."""
    tokens = jnp.concatenate([text_tokens, extra.astype(text_tokens.dtype)], axis=1)
    mask = jnp.concatenate([text_mask, jnp.ones(extra.shape[:2], dtype=bool)], axis=1)
    return tokens, mask


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
    def openpi_prune_capacity(self, image_tokens, settings):
        return image_tokens if settings.method == self.name else None

    @hookimpl
    def openpi_prune_select(self, scores, candidate_mask, settings):
        return candidate_mask if settings.method == self.name else None

    @hookimpl
    def openpi_prune_select_train(self, scores, candidate_mask, image_tokens, noise, settings):
        return (image_tokens, candidate_mask) if settings.method == self.name else None


class SchemeB:
    name = "scheme_b"
    names = ("scheme_b", "scheme_a")  # both vote against the projected noisy actions

    @hookimpl
    def openpi_prune_methods(self):
        return [self.name]

    @hookimpl
    def openpi_prune_init_model(self, model, config, rngs, settings):
        if settings.method not in self.names:
            return
        from flax import nnx
        from openpi.models import gemma

        # Noisy action and its flow-matching time in, one task token per action step out, as wide
        # as the prompt's embeddings so that both can be normalised and attended to together.
        width = gemma.get_config(config.paligemma_variant).width
        setattr(model, PROJECTOR, nnx.Linear(config.action_dim + 1, width, rngs=rngs))

    @hookimpl
    def openpi_prune_task_context(self, model, text_tokens, text_mask, noisy_actions, time, settings):
        if settings.method not in self.names:
            return None
        projector = getattr(model, PROJECTOR, None)
        if projector is None:
            raise PruneInputError(
                f"{settings.method} needs the action projector, and this Pi0 has none: it was created "
                f"before openpi-prune was enabled with method {settings.method}. Enable it first, then "
                "create (or load) the model."
            )
        if noisy_actions is None:
            raise PruneInputError(
                f"{settings.method} needs the noisy actions, which exist only inside Pi0.compute_loss and "
                "Pi0.sample_actions. To call embed_prefix directly, wrap the call in "
                "`openpi_prune.noisy_actions(x_t, time)`."
            )
        steps = noisy_actions.shape[1]
        time_channel = jnp.broadcast_to(time[:, None, None], (time.shape[0], steps, 1))
        action_tokens = projector(
            jnp.concatenate([noisy_actions, time_channel], axis=-1).astype(projector.kernel.dtype)
        )
        return _append(text_tokens, text_mask, action_tokens)


class SchemeA:
    """Scheme B's task tokens, also appended to the prefix as placeholders PaliGemma cannot see."""

    name = "scheme_a"

    @hookimpl
    def openpi_prune_methods(self):
        return [self.name]

    @hookimpl
    def openpi_prune_prefix_extension(self, model, task_tokens, task_mask, settings):
        if settings.method != self.name:
            return None
        steps = model.action_horizon  # the projected actions close the task context
        return task_tokens[:, -steps:]


class ActionQueries:
    """Learned task tokens, one per action step: what the pruner learns it can use at inference."""

    name = "action_queries"

    @hookimpl
    def openpi_prune_methods(self):
        return [self.name]

    @hookimpl
    def openpi_prune_init_model(self, model, config, rngs, settings):
        if settings.method != self.name:
            return
        from flax import nnx
        from openpi.models import gemma

        width = gemma.get_config(config.paligemma_variant).width
        # Prompt-sized values: the pruner RMS-normalises them with the prompt's embeddings.
        init = nnx.initializers.normal(1.0)(rngs.params(), (config.action_horizon, width))
        setattr(model, QUERIES, nnx.Param(init))

    @hookimpl
    def openpi_prune_task_context(self, model, text_tokens, text_mask, noisy_actions, time, settings):
        if settings.method != self.name:
            return None
        queries = getattr(model, QUERIES, None)
        if queries is None:
            raise PruneInputError(
                "action_queries needs the learned queries, and this Pi0 has none: it was created before "
                "openpi-prune was enabled with method action_queries. Enable it first, then create (or "
                "load) the model."
            )
        b = text_tokens.shape[0]
        return _append(text_tokens, text_mask, jnp.broadcast_to(queries.value[None], (b, *queries.value.shape)))


class TopShare(LanguageOnly):
    """Keeps each sample's `keep_fraction` best-scoring live patches, in training as at inference
    (subclasses give the score)."""

    @hookimpl
    def openpi_prune_capacity(self, image_tokens, settings):
        # It keeps the fraction of the live patches, at most this many: nothing ever overflows.
        return math.ceil(settings.keep_fraction * image_tokens) if settings.method == self.name else None

    def keep(self, scores, candidate_mask, fraction, settings):
        return relevance.keep_top(scores, candidate_mask, fraction)

    @hookimpl
    def openpi_prune_select(self, scores, candidate_mask, settings):
        if settings.method != self.name:
            return None
        return self.keep(scores, candidate_mask, settings.keep_fraction, settings)

    @hookimpl
    def openpi_prune_select_train(self, scores, candidate_mask, image_tokens, noise, saliency, keep_fraction, settings):
        if settings.method != self.name:
            return None
        kept_mask = self.keep(scores, candidate_mask, keep_fraction, settings)
        return image_tokens, kept_mask, kept_mask


class RandomShare(TopShare):
    """Prompt-blind: a random share, drawn anew for every image (seeded by its tokens)."""

    name = "random"

    @hookimpl
    def openpi_prune_score(self, model, image_tokens, candidate_mask, task_tokens, task_mask, settings):
        if settings.method != self.name:
            return None
        return relevance.random_scores(image_tokens)


class Distinct(TopShare):
    """Prompt-blind: the patches least like the rest of their image."""

    name = "distinct"

    @hookimpl
    def openpi_prune_score(self, model, image_tokens, candidate_mask, task_tokens, task_mask, settings):
        if settings.method != self.name:
            return None
        return jnp.linalg.norm(image_tokens.astype(jnp.float32), axis=-1)


class Relevance(TopShare):
    """A prompt-conditioned relevance head, distilled from the model's own saliency."""

    name = "relevance"

    @hookimpl
    def openpi_prune_init_model(self, model, config, rngs, settings):
        if settings.method != self.name:
            return
        from flax import nnx
        from openpi.models import gemma

        width = gemma.get_config(config.paligemma_variant).width
        hidden = settings.relevance_hidden
        init = nnx.initializers.lecun_normal()
        setattr(model, RELEVANCE_QUERY, nnx.Param(init(rngs.params(), (width, RELEVANCE_RANK))))
        setattr(model, RELEVANCE_KEY, nnx.Param(init(rngs.params(), (hidden or width, RELEVANCE_RANK))))
        if hidden:
            setattr(model, RELEVANCE_HIDDEN_KERNEL, nnx.Param(init(rngs.params(), (2 * width, hidden))))
            setattr(model, RELEVANCE_HIDDEN_BIAS, nnx.Param(jnp.zeros((hidden,))))

    @hookimpl
    def openpi_prune_score(self, model, image_tokens, candidate_mask, task_tokens, task_mask, settings):
        if settings.method != self.name:
            return None
        query, key = getattr(model, RELEVANCE_QUERY, None), getattr(model, RELEVANCE_KEY, None)
        if query is None or key is None:
            raise PruneInputError(
                "relevance needs its learned head, and this Pi0 has none: it was created before openpi-prune "
                "was enabled with method relevance. Enable it first, then create (or load) the model."
            )
        # The head learns from its own loss only: the model's embeddings are not bent to suit it.
        patches, task = jax.lax.stop_gradient(image_tokens), jax.lax.stop_gradient(task_tokens)
        hidden_kernel = getattr(model, RELEVANCE_HIDDEN_KERNEL, None)
        check_relevance_hidden(0 if hidden_kernel is None else hidden_kernel.value.shape[-1], settings, "Pi0")
        if hidden_kernel is not None:
            hidden_bias = getattr(model, RELEVANCE_HIDDEN_BIAS)
            patches = relevance.hidden_features(patches, candidate_mask, hidden_kernel.value, hidden_bias.value)
        return relevance.scores(patches, task, task_mask, query.value, key.value)

    @hookimpl
    def openpi_prune_select_train(self, scores, candidate_mask, image_tokens, noise, saliency, keep_fraction, settings):
        if settings.method != self.name:
            return None
        # The model trains on the share inference keeps, the rest hidden: by default the head's own
        # picks, so that it trains on the patches it will see (those of the saliency the head learns
        # from overlap them by about half in the lab).
        # (The saliency's log: its softmax is the normalised saliency the head learns, for keep_mass.)
        chosen_by = scores if saliency is None or settings.train_picks == "head" else jnp.log(saliency + 1e-30)
        kept_mask = self.keep(chosen_by, candidate_mask, keep_fraction, settings)
        return image_tokens, kept_mask, kept_mask

    def keep(self, scores, candidate_mask, fraction, settings):
        if settings.keep_mass:  # adaptive: as many as the scene's relevance needs, within the share
            return relevance.keep_mass(scores, candidate_mask, settings.keep_mass, fraction)
        return relevance.keep_top(scores, candidate_mask, fraction)

    @hookimpl
    def openpi_prune_wants_saliency(self, settings):
        return True if settings.method == self.name else None

    @hookimpl
    def openpi_prune_distill_loss(self, scores, saliency, candidate_mask, settings):
        if settings.method != self.name:
            return None
        return relevance.distillation_loss(scores, saliency, candidate_mask)


BUILTIN = (
    LightVLAVote(),
    SchemeB(),
    SchemeA(),
    ActionQueries(),
    Relevance(),
    RandomShare(),
    Distinct(),
    LanguageOnly(),
    KeepAll(),
)
