"""The lab's pictures: kept patches drawn over the scenes, and the training curves."""

import pathlib
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from openpi_prune.tools.lab import scenes  # noqa: E402


def _overlay(image: np.ndarray, kept: np.ndarray, target: np.ndarray, grid: int) -> np.ndarray:
    """The image in [0, 1], pruned patches darkened; kept patches at full brightness."""
    rgb = (image + 1) / 2
    patch = rgb.shape[0] // grid
    shade = np.where(kept.reshape(grid, grid), 1.0, 0.25).repeat(patch, 0).repeat(patch, 1)
    return np.clip(rgb * shade[..., None], 0, 1)


def kept_patches(
    val: scenes.Batch,
    kept_masks: dict,
    spec: scenes.SceneSpec,
    path: pathlib.Path,
    scenes_shown: int = 2,
    captions: list[str] | None = None,
) -> None:
    """One row per variant: for the first scenes, both live cameras with pruned patches darkened and
    the target's patches outlined in white (`captions`: what each scene's prompt names; default its
    block's colour)."""
    cameras = list(scenes.TABLES)
    grid, per = spec.grid, spec.grid**2
    shown = min(scenes_shown, val.actions.shape[0])
    rows = list(kept_masks.items())
    if not rows:
        return
    fig, axes = plt.subplots(
        len(rows), shown * len(cameras), figsize=(2.2 * shown * len(cameras), 2.3 * len(rows)), squeeze=False
    )
    for r, (name, kept) in enumerate(rows):
        for s in range(shown):
            for c, camera in enumerate(cameras):
                ax = axes[r, s * len(cameras) + c]
                patches = slice(c * per, (c + 1) * per)
                ax.imshow(_overlay(val.images[camera][s], kept[s, patches], val.target_mask[s, patches], grid))
                target = val.target_mask[s, patches].reshape(grid, grid)
                size = spec.image_size / grid
                for i, j in zip(*np.nonzero(target), strict=True):
                    ax.add_patch(plt.Rectangle((j * size, i * size), size, size, fill=False, ec="white", lw=0.8))
                named = captions[s] if captions else list(scenes.COLOURS)[val.target[s]]
                ax.set_title(f"{camera.split('_')[0]}, '{named}': {int(kept[s, patches].sum())} kept", fontsize=7)
                ax.set_xticks([])
                ax.set_yticks([])
            axes[r, 0].set_ylabel(name, fontsize=7)
    fig.suptitle("kept patches (bright) and the named objects' patches (white outline)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values: list[float], width: int = 10) -> np.ndarray:
    values = np.asarray(values, float)
    if len(values) < width:
        return values
    return np.convolve(values, np.ones(width) / width, mode="valid")


def training(histories: dict, path: pathlib.Path) -> None:
    """Loss of the baseline, then loss, kept count and validation MSE of each variant over its
    fine-tuning steps."""
    fig, (base, loss, kept, val) = plt.subplots(1, 4, figsize=(20, 4))
    if "unpruned" in histories:
        base.plot(_smooth([h["loss"] for h in histories["unpruned"]]))
    base.set(title="baseline training loss (unpruned)", xlabel="step", yscale="log")
    for name, history in histories.items():
        if name == "unpruned" or not history:
            continue
        loss.plot(_smooth([h.get("action_loss", h["loss"]) for h in history]), label=name)
        if "kept" in history[0]:
            kept.plot(_smooth([h["kept"] for h in history]), label=name)
        checked = [(step + 1, h["val_mse_vs_mean"]) for step, h in enumerate(history) if "val_mse_vs_mean" in h]
        if checked:
            val.plot(*zip(*checked, strict=True), marker="o", label=name)
    loss.set(title="fine-tuning loss (flow matching)", xlabel="step", yscale="log")
    kept.set(title="kept image tokens (training pass, all cameras)", xlabel="step")
    kept.legend(fontsize=7)
    val.set(title="validation MSE / predict-the-mean", xlabel="step", yscale="log")
    val.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratios(rows: dict, path: pathlib.Path) -> None:
    """Each variant's test MSE over the reference's, with its 95 % interval, on a log axis; the
    1.10 line is the issue's bar."""
    named = [(name, row["test_ratio"]) for name, row in rows.items() if isinstance(row.get("test_ratio"), dict)]
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(named) + 1.2))  # room for the variants' long names
    for i, (name, pair) in enumerate(named):
        ax.errorbar(
            pair["ratio"],
            i,
            xerr=[[pair["ratio"] - pair["low"]], [pair["high"] - pair["ratio"]]],
            fmt="o",
            capsize=4,
            color=_colour(name),
        )
    ax.axvline(1.0, color="black", lw=0.8)
    ax.axvline(1.10, color="tab:red", lw=0.8, ls="--", label="1.10")
    ax.set_yticks(range(len(named)), [n for n, _ in named])
    ax.set_xscale("log")
    ax.set_xlabel("test MSE / unpruned reference (paired, 95 % interval)")
    ax.legend(loc="lower left", bbox_to_anchor=(1.01, 0))  # outside: no point hides behind it
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ratio_by_steps(rows: list[dict], path: pathlib.Path) -> None:
    """Each variant's MSE over the reference's against its fine-tuning steps: validation (where the
    count is chosen) solid, test dashed, with 95 % intervals; the 1.10 line is the issue's bar."""
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(10, 4.2))
    pruned = [r for r in rows if not r["variant"].startswith("reference")]  # the reference is 1 by definition
    colours = _line_colours(dict.fromkeys(r["variant"] for r in pruned))
    for name, colour in colours.items():
        mine = [r for r in pruned if r["variant"] == name]
        steps = np.asarray([r["steps"] for r in mine], float)
        for key, style in (("validation_ratio", "o-"), ("test_ratio", "s--")):
            ratio = np.asarray([r[key]["ratio"] for r in mine])
            spread = [ratio - [r[key]["low"] for r in mine], [r[key]["high"] for r in mine] - ratio]
            # Test points a little to the right, so that the two intervals do not hide each other.
            ax.errorbar(
                steps * (1.03 if key == "test_ratio" else 1),
                ratio,
                yerr=spread,
                fmt=style,
                capsize=3,
                color=colour,
                label=name if key == "validation_ratio" else None,
            )
    ax.axhline(1.10, color="tab:red", lw=0.8, ls=":", label="1.10")
    counts = sorted({r["steps"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(counts, [str(s) for s in counts])
    ax.set_xlabel("fine-tuning steps")
    ax.set_ylabel("MSE / unpruned reference (paired, 95 %)")
    handles, labels = ax.get_legend_handles_labels()
    styles = [Line2D([], [], color="black", marker=m, ls=ls) for m, ls in (("o", "-"), ("s", "--"))]
    ax.legend(
        handles + styles,
        labels + ["validation (choices)", "test"],
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _line_colours(names) -> dict[str, str]:
    """A colour each, for pictures whose variants are told apart by colour alone: the default blue,
    the reference grey, the others from the rest of matplotlib's cycle."""
    rest = iter(f"C{i}" for i in (1, 2, 3, 4, 5, 6, 8, 9) * 4)
    return {
        name: "tab:blue" if name.startswith("default") else "tab:gray" if name.startswith("reference") else next(rest)
        for name in names
    }


def _colour(variant: str) -> str:
    """The default in blue, its other settings in a lighter blue, everything else grey."""
    if variant.startswith("default"):
        return "tab:blue"
    return "tab:cyan" if variant.startswith("relevance") else "tab:gray"


def success(rows: dict, path: pathlib.Path) -> None:
    """Closed-loop success per variant, with Wilson 95 % intervals."""
    names = list(rows)
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(names) + 1.2))  # room for the variants' long names
    for i, name in enumerate(names):
        row = rows[name]
        ax.errorbar(
            row["success"],
            i,
            xerr=[[row["success"] - row["low"]], [row["high"] - row["success"]]],
            fmt="o",
            capsize=4,
            color=_colour(name),
        )
    ax.set_yticks(range(len(names)), names)
    ax.set_xlim(0, 1.02)  # a rate of 1 stays in view
    ax.set_xlabel("closed-loop success on held-out reset seeds (Wilson 95 %)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def success_by_steps(rows: list[dict], path: pathlib.Path) -> None:
    """Each variant's closed-loop success against its fine-tuning steps (Wilson 95 %), and the goal: 3
    points below the reference of each length. A hollow point: a run on unseeded scenes (its own draw)."""
    fig, ax = plt.subplots(figsize=(10, 4.2))
    colours = _line_colours(dict.fromkeys(r["variant"] for r in rows))
    for name, colour in colours.items():
        mine = [r for r in rows if r["variant"] == name]
        steps = [r["steps"] for r in mine]
        success = np.asarray([r["success"] for r in mine])
        spread = [success - [r["low"] for r in mine], [r["high"] for r in mine] - success]
        ax.errorbar(steps, success, yerr=spread, fmt="-", capsize=3, color=colour, label=name)
        for step, rate, row in zip(steps, success, mine, strict=True):
            ax.plot(step, rate, "o", color=colour, markerfacecolor=colour if row["seeded_scenes"] else "white")
        if name.startswith("reference"):
            ax.plot([r["steps"] for r in mine], success - 0.03, ":", color=colour, label="3 points below the reference")
    if not all(r["seeded_scenes"] for r in rows):
        ax.plot([], [], "o", color="black", markerfacecolor="white", label="hollow: unseeded scenes, its own draw")
    counts = sorted({r["steps"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(s) for s in counts])
    ax.set_xlabel("fine-tuning steps")
    ax.set_ylabel("closed-loop success (Wilson 95 %)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gaps_by_fine_tune(rows: list[dict], path: pathlib.Path) -> None:
    """Each variant's points below the reference, a dot per fine-tune and their mean with its 95 %
    interval over the scenes: how far one fine-tune's gap is from another's, against the goal of 3."""
    pruned = [r for r in rows if "gap_to_reference" in r]
    names = list(dict.fromkeys(r["variant"] for r in pruned))
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.8 * len(names)))
    colours = _line_colours(names)
    for y, name in enumerate(names):
        fine_tunes = [r for r in pruned if r["variant"] == name and r["seed"] != "all"]
        means = [r for r in pruned if r["variant"] == name and r["seed"] == "all"]
        # Each fine-tune a line of its own above the mean, so that intervals that overlap stay apart.
        lines = np.linspace(-0.35, -0.05, len(fine_tunes)) if len(fine_tunes) > 1 else [-0.15]
        placed = [*zip(fine_tunes, lines, strict=True), *((r, 0.2) for r in means)]
        for row, height in placed:
            gap = row["gap_to_reference"]
            mean = row["seed"] == "all"
            spread = [[gap["points"] - gap["low"]], [gap["high"] - gap["points"]]]
            ax.errorbar(
                gap["points"],
                y + height,
                xerr=spread,
                fmt="D" if mean else "o",
                color=colours[name],
                alpha=1.0 if mean else 0.45,
                capsize=3,
                markersize=8 if mean else 5,
            )
    ax.axvline(0, color="black", linewidth=0.8)
    ax.axvline(3, color="tab:gray", linestyle=":", label="3 points below the reference")
    ax.errorbar([], [], fmt="o", color="black", alpha=0.45, label="one fine-tune (95 % over the scenes)")
    ax.errorbar([], [], fmt="D", color="black", label="their mean (95 % over the scenes)")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("points below the unpruned reference, same scenes")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def validation_curves(curves: dict, path: pathlib.Path) -> None:
    """Each fine-tune's validation action MSE against its step (log scale): whether more steps would help."""
    fig, ax = plt.subplots(figsize=(11, 3.8))
    colours = _line_colours(curves)
    for name, points in curves.items():
        steps = [p["step"] for p in points]
        mse = [p["validation_action_mse"] for p in points]
        ax.plot(steps, mse, "o-", label=name, color=colours[name])
    ax.set_yscale("log")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("validation action MSE")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the curves stay in view
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _frame(images: dict, kept: np.ndarray | None, merged: np.ndarray | None, grid: int) -> np.ndarray:
    """The cameras side by side, uint8; with `kept` ([camera, patch]), every patch not kept as itself
    darkened: pruned ones, and the slots (`merged`) that hold a region's mean instead."""
    shown = []
    for c, image in enumerate(images.values()):
        rgb = image.astype(np.float32) / 127.5 - 1.0
        mask = np.ones(grid * grid, bool) if kept is None else kept[c] & ~merged[c]
        shown.append(_overlay(rgb, mask, mask, grid))
    return (np.concatenate(shown, axis=1) * 255).astype(np.uint8)


def _kept_caption(kept: np.ndarray, merged: np.ndarray) -> str:
    patches = int((kept & ~merged).sum())
    return f"kept {patches} patches" + (f" + {int(merged.sum())} region means" if merged.any() else "")


def episode_animation(calls: list, grid: int, path: pathlib.Path, title: str) -> None:
    """A GIF of a closed-loop episode, a frame per policy call: what the policy saw, the patches it
    did not keep as themselves darkened (`calls`: (images by camera, kept and merged [camera, patch],
    both None unpruned) per call)."""
    from PIL import Image, ImageDraw

    frames = []
    for k, (images, kept, merged) in enumerate(calls):
        frame = Image.fromarray(_frame(images, kept, merged, grid))
        caption = f"{title}: call {k + 1}" + ("" if kept is None else ", " + _kept_caption(kept, merged))
        ImageDraw.Draw(frame).text((4, 4), caption, fill=(255, 255, 255))
        frames.append(frame)
    if frames:
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=400, loop=0)


def calls_by_task(episodes: dict, grid: int, path: pathlib.Path, title: str, shown: int = 5) -> None:
    """A row per task: `shown` calls spread over its episode (`episodes`: task -> (reset seed,
    success, calls as `episode_animation` takes them)), the patches not kept as themselves darkened:
    what the policy kept as each task went on."""
    fig, axes = plt.subplots(len(episodes), shown, figsize=(3.2 * shown, 2.4 * len(episodes)), squeeze=False)
    for row, (task, (seed, success, calls)) in zip(axes, episodes.items(), strict=True):
        picked = np.unique(np.linspace(0, len(calls) - 1, shown).round().astype(int)) if calls else []
        for k, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if k >= len(picked):
                ax.axis("off")
                continue
            images, kept, merged = calls[picked[k]]
            ax.imshow(_frame(images, kept, merged, grid))
            caption = "" if kept is None else ": " + _kept_caption(kept, merged)
            ax.set_title(f"call {picked[k] + 1}{caption}", fontsize=7)
        row[0].set_ylabel(f"{task.removesuffix('-v3')}\nseed {seed}, {'solved' if success else 'failed'}", fontsize=7)
    fig.suptitle(f"{title}: each task's first episode (patches not kept as themselves darkened)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def first_calls(calls_by_variant: dict, grid: int, path: pathlib.Path) -> None:
    """One row per variant: the first policy call of its recorded episode, both cameras, the pruned
    patches darkened."""
    rows = [(name, calls[0]) for name, calls in calls_by_variant.items() if calls]
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), 1, figsize=(7, 3.4 * len(rows)), squeeze=False)  # room for long names
    for ax, (name, (images, kept, merged)) in zip(axes[:, 0], rows, strict=True):
        ax.imshow(_frame(images, kept, merged, grid))
        ax.set_title(name + ("" if kept is None else ": " + _kept_caption(kept, merged)), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("what each policy kept at its first call (patches not kept as themselves darkened)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # the suptitle's line kept clear
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scene_map(tasks: dict, names: list[str], path: pathlib.Path) -> None:
    """Per task (a row) and run (a panel): the object's place (x, y) in each held-out scene, solved or
    failed, and in the training scenes."""
    fig, axes = plt.subplots(len(tasks), len(names), figsize=(3.2 * len(names), 3.2 * len(tasks)), squeeze=False)
    for row, (task, found) in zip(axes, tasks.items(), strict=True):
        train = np.asarray(found["train"])
        for ax, name in zip(row, names, strict=True):
            failed = set(found["failed"].get(name, ()))
            test = {int(seed): place for seed, place in found["test"].items()}
            solved = np.asarray([p for s, p in test.items() if s not in failed]).reshape(-1, 3)
            lost = np.asarray([p for s, p in test.items() if s in failed]).reshape(-1, 3)
            ax.plot(train[:, 0], train[:, 1], "+", color="0.55", label="training scene")
            ax.plot(solved[:, 0], solved[:, 1], "o", color="tab:green", markerfacecolor="none", label="solved")
            ax.plot(lost[:, 0], lost[:, 1], "x", color="tab:red", markersize=8, mew=2, label="failed")
            ax.set_title(
                f"{textwrap.fill(name, 34)}\n{task.removesuffix('-v3')}: {len(lost)} of {len(test)} failed", fontsize=7
            )
            ax.set_xlabel("object x (m)", fontsize=7)
            ax.set_ylabel("object y (m)", fontsize=7)
            ax.tick_params(labelsize=6)
    axes[0, 0].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
