"""OpenPI's PyTorch model (`PI0Pytorch`), pruned: upstream's actions where nothing is pruned, the
default's compact prefix at upstream positions, one `torch.compile` per capacity, checkpoints,
the torch math against the JAX math, and a small PI0Pytorch served by env var alone."""

import dataclasses
import logging
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import run_child
from openpi.models_pytorch import pi0_pytorch

import openpi_prune
from openpi_prune import call, configs, telemetry
from openpi_prune.adapter import install, pytorch, table
from openpi_prune.errors import PruneInputError, UntrainedParametersWarning
from openpi_prune.pruner import lightvla, methods, pipeline, relevance, torch_pipeline
from openpi_prune.pruner import torch_ops as ops
from openpi_prune.tools import small

CFG = small.config(pi05=True)


def _sample(model, seed=0, batch_size=2, steps=2, **observation):
    """OpenPI's `sample_actions`, uncompiled (its compiled twin is tested below), and this call's figures."""
    obs = small.torch_observation(small.observation(CFG, batch_size=batch_size, seed=seed, **observation))
    noise = torch.randn(batch_size, CFG.action_horizon, CFG.action_dim, generator=torch.Generator().manual_seed(seed))
    actions = pi0_pytorch.PI0Pytorch.sample_actions(model, "cpu", obs, noise=noise, num_steps=steps)
    return actions, pytorch.take_figures(model)


@pytest.fixture(scope="module")
def upstream():
    """A small PI0Pytorch built by OpenPI alone (no openpi-prune anywhere on it)."""
    with openpi_prune.disabled():
        return small.create_pytorch(CFG, seed=3)


def _twin(upstream, **settings):
    """A model built with openpi-prune enabled under `settings`, with `upstream`'s weights."""
    with openpi_prune.enabled(**settings):
        model = small.create_pytorch(CFG, seed=4)
    missing, unexpected = model.load_state_dict(upstream.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("prune_") for k in missing)
    return model


def test_keep_all_and_disabled_give_upstream_pytorch_s_actions_exactly(upstream):
    expected, figures = _sample(upstream, camera_masks={"right_wrist_0_rgb": [True, False]})
    assert figures is None
    twin = _twin(upstream, method="keep_all")
    with openpi_prune.enabled(method="keep_all"):
        actions, figures = _sample(twin, camera_masks={"right_wrist_0_rgb": [True, False]})
    assert torch.equal(actions, expected)
    assert figures[1]["kept"].tolist() == [768, 512] and figures[1]["prefix_length"].tolist() == [800, 800]
    # A model built pruned runs OpenPI's own once openpi-prune is disabled.
    default = _twin(upstream)
    actions, figures = _sample(default, camera_masks={"right_wrist_0_rgb": [True, False]})
    assert torch.equal(actions, expected) and figures is None


def test_the_default_keeps_a_fifth_in_a_compact_prefix_at_upstream_positions(upstream):
    default = _twin(upstream)
    expected, _ = _sample(upstream)
    with openpi_prune.enabled():
        compact, figures = _sample(default)
    with openpi_prune.enabled(mode="masked"):
        masked, masked_figures = _sample(default)
    with openpi_prune.enabled(keep_positions=False):
        renumbered, _ = _sample(default)
    description, values = figures
    assert description["method"] == "relevance" and description["capacity"] == 154
    assert values["kept"].tolist() == [154, 154] and values["prefix_length"].tolist() == [154 + 32] * 2
    assert values["kept_per_camera"].sum(axis=1).tolist() == [154, 154]
    np.testing.assert_array_equal(values["kept_mask"], masked_figures[1]["kept_mask"])
    # The same kept tokens at the same positions: the 186-slot prefix acts as the 800-slot masked one.
    torch.testing.assert_close(compact, masked, atol=2e-5, rtol=0)
    rounding = (compact - masked).abs().max()
    assert (compact - expected).abs().max() > 10 * rounding  # pruning shows in the actions
    assert (renumbered - masked).abs().max() > 10 * rounding  # positions matter


def test_torch_compile_traces_once_per_capacity_not_per_sample(upstream):
    from torch._dynamo.testing import CompileCounter

    default = _twin(upstream)
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(pi0_pytorch.PI0Pytorch.sample_actions.__get__(default), backend=counter)
    with openpi_prune.enabled():
        frames = []
        for seed in range(3):
            obs = small.torch_observation(small.observation(CFG, batch_size=2, seed=seed))
            noise = torch.randn(2, CFG.action_horizon, CFG.action_dim, generator=torch.Generator().manual_seed(seed))
            actions = compiled("cpu", obs, noise=noise, num_steps=2)
            kept_mask = pytorch.take_figures(default)[1]["kept_mask"]
            eager, figures = _sample(default, seed=seed)
            assert torch.equal(actions, eager)
            np.testing.assert_array_equal(kept_mask, figures[1]["kept_mask"])
            frames.append(counter.frame_count)
    assert frames[0] > 0 and frames == [frames[0]] * 3  # different patches kept, nothing recompiled
    torch._dynamo.reset()


def test_a_checkpoint_without_the_head_loads_fresh_and_a_trained_one_round_trips(upstream, tmp_path):
    import safetensors.torch

    plain = tmp_path / "plain" / "model.safetensors"
    plain.parent.mkdir()
    safetensors.torch.save_model(upstream, str(plain))
    # A twin's model config turns pruning on as it builds the model (no enable() here).
    twin = configs.PrunedPi0Config(**{f.name: getattr(CFG, f.name) for f in dataclasses.fields(CFG) if f.init})
    train_config = types.SimpleNamespace(model=twin)
    assert not openpi_prune.is_enabled()
    with install.patched(table.SMALL_SIGLIP_PYTORCH, siglip_variant="mu/14"):
        with pytest.warns(UntrainedParametersWarning, match="prune_relevance_key, prune_relevance_query"):
            loaded = twin.load_pytorch(train_config, str(plain))  # OpenPI's loader, strict
        assert openpi_prune.is_enabled()
        with torch.no_grad():
            loaded.prune_relevance_query.mul_(3.0)
        trained = tmp_path / "trained" / "model.safetensors"
        trained.parent.mkdir()
        safetensors.torch.save_model(loaded, str(trained))
        again = twin.load_pytorch(train_config, str(trained))
    for name in (methods.RELEVANCE_QUERY, methods.RELEVANCE_KEY):
        assert torch.equal(getattr(again, name), getattr(loaded, name))


def _train(model, steps, lr=1e-3):
    """`steps` optimizer steps on `PI0Pytorch.forward` (OpenPI's loss, as its train_pytorch.py calls
    it); each step's figures and loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    obs = small.torch_observation(small.observation(CFG, batch_size=2))
    actions = torch.from_numpy(np.asarray(small.actions(CFG, batch_size=2)))
    history = []
    for _ in range(steps):
        loss = model(obs, actions).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append((pytorch.take_figures(model), loss.item()))
    return history


def test_a_pruned_pytorch_model_ramps_learns_the_head_from_saliency_and_goes_compact(upstream, caplog):
    default = _twin(upstream).train()
    head = {n: p.detach().clone() for n, p in default.named_parameters() if n.startswith("prune_")}
    others = default.action_out_proj.weight.detach().clone()
    telemetry.clear()
    with openpi_prune.enabled(keep_ramp_steps=4, saliency_every=2, log_every=3):
        with caplog.at_level(logging.INFO, "openpi_prune"):
            history = _train(default, 6)
    # Each pass reported to the hooks; the training log's line every 3rd step.
    assert [int(r.training_step[0]) for r in telemetry.recent()] == list(range(6))
    lines = [r.getMessage() for r in caplog.records if "openpi-prune at training step" in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == [
        "openpi-prune at training step 2",
        "openpi-prune at training step 5",
    ]
    assert "head's loss" in lines[0]
    assert int(getattr(default, pytorch.STEP)) == 6
    kept = [figures[1]["kept"].tolist() for figures, _ in history]
    shares = [float(call.gradual_keep_fraction(step, 4, 0.2)) for step in range(6)]
    assert kept == [[int(np.ceil(share * 768))] * 2 for share in shares]  # the ramp, step by step
    lengths = [int(figures[1]["prefix_length"][0]) for figures, _ in history]
    assert lengths == [800, 800, 800, 800, 186, 186]  # full length during the ramp, compact after
    distilled = ["distill_loss" in figures[1] for figures, _ in history]
    assert distilled == [True, False, True, False, True, False]  # the saliency on every 2nd step
    assert np.isfinite([loss for _, loss in history]).all()
    assert not torch.equal(default.action_out_proj.weight, others)  # the model learns
    assert all(not torch.equal(getattr(default, n), v) for n, v in head.items())  # and so does the head


def test_a_pytorch_head_with_a_hidden_layer_is_made_as_jax_s_and_learns_all_of_it(upstream):
    model = _twin(upstream, relevance_hidden=16).train()
    width = model.prune_relevance_query.shape[0]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n.startswith("prune_")}
    assert shapes == {
        methods.RELEVANCE_QUERY: (width, methods.RELEVANCE_RANK),
        methods.RELEVANCE_KEY: (16, methods.RELEVANCE_RANK),
        methods.RELEVANCE_HIDDEN_KERNEL: (2 * width, 16),
        methods.RELEVANCE_HIDDEN_BIAS: (16,),
    }
    head = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("prune_")}
    with openpi_prune.enabled(relevance_hidden=16, saliency_every=1):
        history = _train(model, 2)
        actions, _ = _sample(model.eval())
    assert np.isfinite([loss for _, loss in history]).all() and torch.isfinite(actions).all()
    assert all(not torch.equal(getattr(model, n), v) for n, v in head.items())
    with openpi_prune.enabled(), pytest.raises(openpi_prune.PruneInputError, match="relevance_hidden=16"):
        _sample(model)


def test_the_saliency_is_the_gradient_of_openpi_s_unpruned_loss_and_leaves_its_draws_alone(upstream):
    """The probe pass: what `_saliency` returns is the gradient norm of upstream's own loss at each
    image token, and the pruned pass after it draws the same augmentation as without it."""
    default = _twin(upstream).train()
    obs = small.torch_observation(small.observation(CFG, batch_size=2))
    actions = torch.from_numpy(np.asarray(small.actions(CFG, batch_size=2)))
    noise, time = torch.randn(2, 10, 32), torch.full((2,), 0.5)
    with openpi_prune.enabled():
        torch.manual_seed(0)
        saliency = pytorch._saliency(default.forward.args[1], obs, actions, noise, time, share=1.0)
        after = torch.rand(3)
        torch.manual_seed(0)  # saliency_share=0.5: the first sample's, the same as in the whole batch's
        half = pytorch._saliency(default.forward.args[1], obs, actions, noise, time, share=0.5)
    with openpi_prune.enabled(saliency="deviation"):
        torch.manual_seed(0)
        deviation = pytorch._saliency(default.forward.args[1], obs, actions, noise, time, share=1.0)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))  # the probe gave its random draws back
    # By hand: upstream's own forward, its image tokens perturbed by a delta, the same draws.
    upstream.train()
    embed_prefix, deltas, tokens = upstream.embed_prefix, [], []

    def perturbed(*args):
        embs, pad_masks, att_masks = embed_prefix(*args)
        deltas.append(torch.zeros_like(embs[:, :768], requires_grad=True))
        tokens.append(embs[:, :768].detach())
        return torch.cat([embs[:, :768] + deltas[0], embs[:, 768:]], dim=1), pad_masks, att_masks

    upstream.embed_prefix = perturbed
    try:
        torch.manual_seed(0)
        loss = upstream(obs, actions, noise=noise, time=time)
        (grad,) = torch.autograd.grad(loss.sum(), deltas[0])
    finally:
        del upstream.embed_prefix
        upstream.eval()
    assert saliency.shape == (2, 768) and (saliency > 0).all()
    torch.testing.assert_close(saliency, torch.linalg.vector_norm(grad, dim=-1), rtol=1e-5, atol=1e-8)
    # saliency=deviation: the loss's first-order change were each token the batch's mean token there.
    change = (grad * (tokens[0] - tokens[0].mean(0, keepdim=True))).sum(-1).abs()
    torch.testing.assert_close(deviation, change, rtol=1e-4, atol=1e-7)
    assert half.shape == (2, 768) and (half[1] == 0).all()
    torch.testing.assert_close(half[0], saliency[0], rtol=1e-4, atol=1e-8)


def test_a_method_without_a_pytorch_version_is_refused_with_what_to_use(upstream):
    twin = _twin(upstream, method="scheme_b")
    with openpi_prune.enabled(method="scheme_b"), pytest.raises(PruneInputError, match="relevance, distinct"):
        _sample(twin)


def test_a_policy_of_a_model_built_before_pruning_was_enabled_is_refused_with_what_to_do(upstream):
    from openpi.policies import policy as _policy

    served = _policy.Policy(upstream, is_pytorch=True, sample_kwargs={"num_steps": 1})
    obs = small.observation(CFG)
    example = {
        "image": {k: np.asarray((v[0] + 1) * 127.5, np.uint8) for k, v in obs.images.items()},
        "image_mask": {k: np.asarray(v[0]) for k, v in obs.image_masks.items()},
        "state": np.asarray(obs.state[0]),
        "tokenized_prompt": np.asarray(obs.tokenized_prompt[0]),
        "tokenized_prompt_mask": np.asarray(obs.tokenized_prompt_mask[0]),
    }
    with openpi_prune.enabled(), pytest.raises(PruneInputError, match="built before openpi-prune was enabled"):
        served.infer(example)


# --- the torch math against the JAX math, on the same arrays


def _arrays(seed, b=2, n=96, t=7, d=32):
    rng = np.random.default_rng(seed)
    patches = rng.normal(size=(b, n, d)).astype(np.float32)
    patches[:, ::9] = np.round(patches[:, ::9])  # some equal values: ties in the medians
    task = rng.normal(size=(b, t, d)).astype(np.float32)
    candidate = rng.random((b, n)) > 0.15
    task_mask = np.arange(t)[None] < np.array([[t], [3]])
    return patches, task, candidate, task_mask


@pytest.mark.parametrize("seed", range(3))
def test_the_torch_math_gives_the_jax_math_s_numbers_and_kept_sets(seed):
    patches, task, candidate, task_mask = _arrays(seed)
    t = {k: torch.from_numpy(v) for k, v in dict(p=patches, t=task, c=candidate, m=task_mask).items()}
    j = {k: jnp.asarray(v) for k, v in dict(p=patches, t=task, c=candidate, m=task_mask).items()}
    close = dict(rtol=1e-5, atol=1e-5)
    for scoring in ("robust", "centred", "lightvla"):
        np.testing.assert_allclose(
            ops.prepare(t["p"], t["c"], t["t"], t["m"], scoring)[0].numpy(),
            np.asarray(lightvla.prepare(j["p"], j["c"], j["t"], j["m"], scoring)[0]),
            **close,
        )
    np.testing.assert_allclose(
        ops.vote_scores(t["p"], t["t"], t["m"]), lightvla.vote_scores(j["p"], j["t"], j["m"]), **close
    )
    kernels = np.random.default_rng(seed).normal(size=(2, 32, 8)).astype(np.float32)
    scores = relevance.scores(j["p"], j["t"], j["m"], *kernels)
    np.testing.assert_allclose(
        ops.relevance_scores(t["p"], t["t"], t["m"], *map(torch.from_numpy, kernels)), scores, **close
    )
    # The selections, on the same scores (ties included): exactly the same patches.
    scores = np.round(np.asarray(scores), 1)
    ts, js = torch.from_numpy(scores), jnp.asarray(scores)
    np.testing.assert_array_equal(ops.keep_top(ts, t["c"], 0.2), relevance.keep_top(js, j["c"], 0.2))
    np.testing.assert_array_equal(ops.keep_mass(ts, t["c"], 0.5, 0.3), relevance.keep_mass(js, j["c"], 0.5, 0.3))
    priority = relevance.priority(js, j["c"])
    np.testing.assert_array_equal(ops.priority(ts, t["c"]), priority)
    kept = relevance.keep_top(js, j["c"], 0.3)
    for got, want in zip(
        ops.fit_capacity(torch.from_numpy(np.asarray(kept)), torch.from_numpy(np.asarray(priority)), 20),
        lightvla.fit_capacity(kept, priority, 20),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)
    votes = np.round(np.asarray(lightvla.vote_scores(j["p"], j["t"], j["m"])), 2)
    np.testing.assert_array_equal(
        ops.votes(torch.from_numpy(votes), t["c"]), lightvla.votes(jnp.asarray(votes), j["c"])
    )
    gradient = np.random.default_rng(seed + 10).normal(size=patches.shape).astype(np.float32)
    for kind in ("gradient", "deviation"):
        np.testing.assert_allclose(
            ops.saliency(torch.from_numpy(gradient), t["p"], kind), relevance.saliency(gradient, j["p"], kind), **close
        )


def _both_pipelines(settings, head: dict[str, np.ndarray]):
    """The JAX pipeline's and the torch pipeline's pruned prefixes of the same three cameras of 6 x 6
    patches, under `settings` and the relevance head's parameters `head`."""
    patches, task, candidate, task_mask = _arrays(7, n=3 * 36)
    ar_mask = np.zeros(108 + 7, bool)
    model = types.SimpleNamespace(**{name: types.SimpleNamespace(value=jnp.asarray(k)) for name, k in head.items()})
    prefix = pipeline.Prefix(
        jnp.asarray(patches),
        jnp.asarray(task),
        jnp.asarray(candidate),
        jnp.asarray(task_mask),
        jnp.asarray(ar_mask),
        36,
    )
    want = pipeline.prune(model, prefix, None, settings)
    got = torch_pipeline.prune(
        {name: torch.from_numpy(k) for name, k in head.items()},
        torch.from_numpy(patches),
        torch.from_numpy(task),
        torch.from_numpy(candidate),
        torch.from_numpy(task_mask),
        torch.from_numpy(ar_mask)[None].expand(2, -1),
        36,
        settings,
    )
    np.testing.assert_array_equal(got.slot_source, want.slot_source)
    np.testing.assert_array_equal(got.pad_mask, want.input_mask)
    np.testing.assert_allclose(got.tokens, want.tokens, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("merge_unkept", [0, 4])
@pytest.mark.parametrize("method", torch_pipeline.METHODS)
def test_the_torch_pipeline_keeps_the_jax_pipeline_s_patches(method, merge_unkept):
    kernels = np.random.default_rng(1).normal(size=(2, 32, 8)).astype(np.float32)
    # The vote's kept set overflows 40 slots: the slots go to the most voted patches.
    capacity = 40 if method == "language_only" else None
    # The bilinear head (its two kernels); the hidden layer has its own test below.
    settings = openpi_prune.PruneSettings(
        method=method, capacity=capacity, merge_unkept=merge_unkept, relevance_hidden=0, telemetry=False, warn_below=0
    )
    _both_pipelines(settings, dict(zip((methods.RELEVANCE_QUERY, methods.RELEVANCE_KEY), kernels, strict=True)))


def test_the_torch_head_with_a_hidden_layer_keeps_the_jax_head_s_patches():
    rng = np.random.default_rng(2)
    head = {
        methods.RELEVANCE_QUERY: rng.normal(size=(32, 8)),
        methods.RELEVANCE_KEY: rng.normal(size=(16, 8)),
        methods.RELEVANCE_HIDDEN_KERNEL: rng.normal(size=(64, 16)) / 8,
        methods.RELEVANCE_HIDDEN_BIAS: rng.normal(size=16),
    }
    head = {name: value.astype(np.float32) for name, value in head.items()}
    settings = openpi_prune.PruneSettings(method="relevance", relevance_hidden=16, telemetry=False, warn_below=0)
    _both_pipelines(settings, head)


SERVED = """
import json, socket, threading, time
import numpy as np
from openpi.models_pytorch import pi0_pytorch
from openpi.policies import policy as _policy
from openpi.serving import websocket_policy_server
from openpi_client import websocket_client_policy
import openpi_prune
from openpi_prune.tools import small
cfg = small.config(pi05=True)
policy = _policy.Policy(small.create_pytorch(cfg), is_pytorch=True, sample_kwargs={"num_steps": 1})
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
server = websocket_policy_server.WebsocketPolicyServer(policy, host="127.0.0.1", port=port)
threading.Thread(target=server.serve_forever, daemon=True).start()
for _ in range(600):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close(); break
    except OSError:
        time.sleep(0.1)
client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)
obs = small.observation(cfg, camera_masks={"right_wrist_0_rgb": [False]})
example = {"image": {k: np.asarray((v[0] + 1) * 127.5, np.uint8) for k, v in obs.images.items()},
           "image_mask": {k: np.asarray(v[0]) for k, v in obs.image_masks.items()}, "state": np.asarray(obs.state[0]),
           "tokenized_prompt": np.asarray(obs.tokenized_prompt[0]), "tokenized_prompt_mask": np.asarray(obs.tokenized_prompt_mask[0])}
response = client.infer(example)
figures = response["pruning"]
print(json.dumps({"enabled": openpi_prune.is_enabled(), "shape": list(response["actions"].shape),
                  "finite": bool(np.isfinite(response["actions"]).all()), "method": figures["method"],
                  "kept": figures["kept"], "live": figures["live_image_tokens"],
                  "per_camera": figures["kept_per_camera"].tolist(), "prefix": figures["prefix_length"]}))
"""


def test_a_pytorch_policy_served_by_env_var_alone_returns_its_pruning_to_openpi_client():
    # Eager here (torch.compile's C++ build takes minutes on a CPU; compiling is tested above).
    result = run_child(SERVED, OPENPI_PRUNE="1", TORCHDYNAMO_DISABLE="1")
    assert result["enabled"] and result["method"] == "relevance"
    assert result["shape"] == [CFG.action_horizon, CFG.action_dim] and result["finite"]
    assert result["live"] == 512 and result["kept"] == 103  # 20 % of the two live cameras' 512
    assert result["per_camera"][2] == 0 and sum(result["per_camera"]) == 103
    assert result["prefix"] == 154 + CFG.max_token_len  # 20 % of 768 slots, then the prompt


def test_jax_and_pytorch_keep_the_same_patches_on_shared_weights():
    """A JAX Pi0 and a PI0Pytorch with the same prefix weights (SigLIP, its projection, the
    embeddings, the head) give the same prefix tokens and keep the same patches."""
    import jax

    from openpi_prune import telemetry

    with openpi_prune.enabled():
        jax_model = small.create(CFG, seed=5)
        torch_model = small.create_pytorch(CFG, seed=5)
    small.copy_prefix_weights(jax_model, torch_model)
    obs = small.observation(CFG, batch_size=2, seed=11, camera_masks={"right_wrist_0_rgb": [True, False]})
    images, img_masks, lang, lang_masks, _ = torch_model._preprocess_observation(
        small.torch_observation(obs), train=False
    )
    with openpi_prune.disabled():
        want = np.asarray(jax_model.embed_prefix(obs)[0])
        got = torch_model.embed_prefix(images, img_masks, lang, lang_masks)[0].detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    for settings in ({}, {"method": "distinct"}, {"method": "language_only", "capacity": 96}):
        with openpi_prune.enabled(**settings):
            telemetry.clear()
            jax_model.embed_prefix(obs)
            jax.effects_barrier()
            want = telemetry.recent()[-1].kept_mask
            torch_model.embed_prefix(images, img_masks, lang, lang_masks)
            got = pytorch.take_figures(torch_model)[1]["kept_mask"]
        assert got.sum() > 0 and got[1, 512:].sum() == 0  # the masked camera: nothing kept
        np.testing.assert_array_equal(got, want, err_msg=str(settings))


def test_the_bench_times_upstream_pytorch_beside_the_pruned_variants():
    from openpi_prune.tools.bench import pytorch_model

    rows = pytorch_model.run(
        paligemma="dummy",
        action_expert="dummy",
        siglip="mu/14",
        batch_size=1,
        num_steps=1,
        repeats=2,
        compile_mode="none",
    )
    assert [row.name for row in rows] == [name for name, _ in pytorch_model.VARIANTS]
    assert [(row.prefix, row.kept) for row in rows] == [(816, 768), (816, 768), (154 + 48, 154), (77 + 48, 77)]
    assert all(len(row.times_ms) == 2 and row.median_ms > 0 for row in rows)
