"""What a Meta-World run is: the variants it fine-tunes, and the plan (tasks, schedules, episodes)
that its folder holds to. `metaworld_trial` runs it; `metaworld_report` reads what it wrote."""

import dataclasses
import pathlib

from openpi_prune.tools.lab import metaworld, train, trial_plan

# name -> settings changes, None: the baseline as trained (no fine-tuning, no pruning).
VARIANTS = {
    "unpruned checkpoint": None,
    "unpruned checkpoint, images blanked": None,
    trial_plan.REFERENCE: dict(method="keep_all", scoring="lightvla"),
    trial_plan.DEFAULT: dict(method="relevance"),
    # The default's head before its hidden layer: the control of the one now.
    "relevance, the bilinear head (relevance_hidden=0)": dict(method="relevance", **trial_plan.BILINEAR),
    # The widest share the goal allows (10-30 %): does more of the scene close the gap at 20 %?
    "relevance, 30 % kept": dict(method="relevance", **trial_plan.BILINEAR, keep_fraction=0.3),
    # As many tokens as the default (26 of the 128 live), 8 of them the means of the unkept patches of
    # each quarter of an image: better than the default at the same count on the blocks trial.
    "relevance, 14 % kept, merged by quarter (the default's count)": dict(
        method="relevance", keep_fraction=0.14, merge_unkept=4, **trial_plan.BILINEAR
    ),
    # As many tokens as the 30 % share (39 of 128), 8 of them quarter means: does merging add to a wider share?
    "relevance, 24 % kept, merged by quarter (the 30 % share's count)": dict(
        method="relevance", keep_fraction=0.24, merge_unkept=4, **trial_plan.BILINEAR
    ),
    # The same count spent mostly on a coarse view: 7 patches, and the means of the unkept ones of each
    # 2 x 2 block of patches (16 a camera). Is it the outline of the whole scene that the merge adds?
    "relevance, 5 % kept, merged by 2 x 2 patches (the 30 % share's count)": dict(
        method="relevance", keep_fraction=0.05, merge_unkept=16, **trial_plan.BILINEAR
    ),
    # SigLIP on each camera's kept patches alone (a share per camera): cheaper, and on the blocks trial
    # more accurate than pruning after it.
    "relevance, pruned before SigLIP (siglip_layer=0)": dict(method="relevance", siglip_layer=0, **trial_plan.BILINEAR),
    # The head follows the model's saliency loosely (its picks are about 60 % of the saliency's top);
    # the saliency of a quarter of each batch on every step gives it four times the updates of the
    # default's (every 4th step) at a lower cost.
    "relevance, saliency of a quarter of each batch": dict(
        method="relevance", saliency_every=1, saliency_share=0.25, **trial_plan.BILINEAR
    ),
    # The head's form: a hidden layer of 256 on each patch (beside its scene's mean patch) before the
    # bilinear score. More updates did not bring the bilinear head closer to the saliency (above); a
    # head that can weigh a patch's features together might.
    "relevance, a hidden layer of 256 in the head": dict(method="relevance", relevance_hidden=256),
    # The one change to the head that moved the closed loop was its form (bilinear -> hidden layer):
    # four times the width, to see whether that lever has more in it.
    "relevance, a hidden layer of 1024 in the head": dict(method="relevance", relevance_hidden=1024),
    # The hidden head with more of the scene: the widest share the goal allows, and the same count of
    # tokens with 8 of them quarter means, the two wider shares that came closest with the bilinear head.
    "relevance, a hidden layer of 256, 30 % kept": dict(method="relevance", relevance_hidden=256, keep_fraction=0.3),
    "relevance, a hidden layer of 256, 24 % kept, merged by quarter": dict(
        method="relevance", relevance_hidden=256, keep_fraction=0.24, merge_unkept=4
    ),
    # Each camera its own 20 % (13 patches each) instead of 20 % of both together: the default gives
    # the corner camera, which shows where the window is, 9 of its 64. Pruned after the lab SigLIP's
    # only layer, which is pruning after SigLIP, a share per camera.
    "relevance, each camera its own 20 % (siglip_layer=1, after the lab SigLIP's only layer)": dict(
        method="relevance", siglip_layer=1
    ),
    # The head learns from |gradient . (patch - the batch's mean patch)| instead of the gradient's norm:
    # the default's corner-camera picks at window-open's first call include floor and table, alike in
    # every scene, where the window and its handle move.
    "relevance, saliency of each patch's change from the batch mean (saliency=deviation)": dict(
        method="relevance", saliency="deviation"
    ),
    "verbatim LightVLA": dict(method="language_only", scoring="lightvla"),
    "distinct (prompt-blind)": dict(method="distinct"),
}
BLANKED = "unpruned checkpoint, images blanked"
# From this commit on, a reset seed fixes its scene in every process (MT1 is seeded when made): two runs
# of it or later meet the same 250 scenes, so that their episodes pair; earlier runs drew their own.
SEEDED_SINCE = "16152f4"


@dataclasses.dataclass(frozen=True)
class SuitePlan:
    spec: metaworld.MetaWorldSpec = metaworld.MetaWorldSpec()
    baseline: train.Schedule = train.Schedule(steps=6000, lr=1e-3, batch_size=32, warmup=100)
    finetune: train.Schedule = train.Schedule(
        steps=1000, lr=3e-4, batch_size=16, warmup=15, seed=100_000, keep_ramp=0.25
    )
    episodes: int = 50  # held-out reset seeds per task
    # The unpruned weights each variant is fine-tuned from (`finetuned/*.npz` of another run, its
    # reference's): LightVLA's recipe, pruning a policy already fine-tuned. None: the trained policy.
    finetune_from: str | None = None
    # Unpruned weights (`finetuned/*.npz` of another run) whose sampled actions, from the noise each
    # fine-tuning step draws, replace the expert's as targets (`train.teacher_targets`). None: the expert's.
    teacher: str | None = None


def quick_plan(out: pathlib.Path) -> SuitePlan:
    return SuitePlan(
        spec=metaworld.MetaWorldSpec(
            episodes_dir=str(out / "episodes"),
            tasks=("button-press-topdown-v3",),
            train_seeds=2,
            max_steps=10,
            expert_steps=150,
        ),
        baseline=train.Schedule(steps=2, lr=1e-3, batch_size=4, warmup=1),
        finetune=train.Schedule(steps=2, lr=3e-4, batch_size=4, warmup=1, seed=100_000, keep_ramp=0.25),
        episodes=1,
    )


def plan_for(
    out_dir: pathlib.Path, quick: bool, episodes_dir: str | None, siglip_depth: int | None = None
) -> SuitePlan:
    """The suite's plan, its expert episodes in `episodes_dir` or the user's cache (quick: in `out_dir`),
    its policy's SigLIP `siglip_depth` layers deep (None: mu/28's one)."""
    plan = quick_plan(out_dir) if quick else SuitePlan()
    if siglip_depth is not None:  # another policy: its own --baseline-dir and --out
        if siglip_depth < 1:
            raise metaworld.SuiteError(f"--siglip-depth must be at least 1 (SigLIP's layers); got {siglip_depth}")
        plan = dataclasses.replace(plan, spec=dataclasses.replace(plan.spec, siglip_depth=siglip_depth))
    folder = episodes_dir or (None if quick else metaworld.episode_cache(plan.spec))
    if folder is None:
        return plan
    return dataclasses.replace(plan, spec=dataclasses.replace(plan.spec, episodes_dir=str(folder)))
