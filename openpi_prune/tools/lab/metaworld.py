"""Meta-World as a lab suite: expert episodes, a small pi0.5 trained on them, closed-loop success.

Meta-World's tasks (MuJoCo, a Sawyer arm) each come with a scripted expert that reads the objects'
positions from the simulator. The policy does not get them: it sees two cameras at 224 x 224 in
OpenPI's format (`corner3` as the base view, `gripperPOV` as the wrist; the right wrist masked, as
in LIBERO), a prompt naming the task, and the robot's own state (hand position, gripper opening)
as discretised tokens after the prompt, as pi0.5 takes its state. So the images are needed to find
the objects, which move with the reset seed.

- `collect`: expert episodes on the train reset seeds, cached on disk (`<task>/<seed>.npz`), by
  default outside the checkout (`episode_cache`), so that a fresh clone on the same machine reuses them.
- `render` (the lab's family interface): training batches drawn from those episodes, so that the
  lab's `train.train` trains on them with OpenPI's `compute_loss`.
- `serve` / `closed_loop`: the model behind OpenPI's `Policy` and `WebsocketPolicyServer`, driven by
  `openpi-client` as a robot is: an action chunk per call, its first `replan` actions executed, as
  OpenPI's LIBERO client does. Success on held-out reset seeds, never seen in training.
"""

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import dataclasses
import gc
import hashlib
import importlib.metadata
import multiprocessing
import os
import pathlib
import socket
import threading
import time
import zlib

import numpy as np

from openpi_prune.tools.lab import scenes

TASKS = {  # task -> the instruction the prompt says
    "button-press-topdown-v3": "press the button from the top",
    "drawer-open-v3": "open the drawer",
    "window-open-v3": "slide the window open",
    "handle-press-v3": "press the handle down",
    "faucet-open-v3": "turn the faucet open",
}
CAMERAS = {"base_0_rgb": "corner3", "left_wrist_0_rgb": "gripperPOV"}
# The state's range, per dimension (hand x, y, z in metres; gripper opening), for its tokens.
STATE_LOW, STATE_HIGH = np.array([-0.6, 0.2, 0.0, 0.0]), np.array([0.6, 1.0, 0.5, 1.0])
STATE_BINS = 256
STATE_TOKENS = 250_000  # first id of the state's bins (PaliGemma's vocabulary ends at 257,152)
WORD_TOKENS = (1_000, 200_000)  # a word's fixed id: a hash of it in this range (no tokenizer download)
TEST_SEEDS = 10_000  # closed-loop reset seeds start here; training's are 0, 1, ...
VALIDATION_SEEDS = 20_000  # expert episodes for choices (the action-MSE check), neither trained on nor tested
INSTALL = (
    "apt-get install -y libegl1 libgl1-mesa-dri (then MUJOCO_GL=egl EGL_PLATFORM=surfaceless), or "
    "apt-get install -y libosmesa6 (then MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa)"
)


class SuiteError(RuntimeError):
    """The suite cannot run here: what is missing, and the command that installs it."""


@dataclasses.dataclass(frozen=True)
class MetaWorldSpec:
    episodes_dir: str = "metaworld-results/episodes"
    tasks: tuple[str, ...] = tuple(TASKS)
    train_seeds: int = 30  # expert episodes per task
    image_size: int = 224
    patch: int = 28  # SigLIP mu/28: 8 x 8 patches a camera
    # SigLIP's layers (mu/28 has 1; full pi0.5's So400m 27): how often each patch has mixed with the
    # others before it is pruned. None: mu/28's own.
    siglip_depth: int | None = None
    horizon: int = 10
    replan: int = 5  # actions executed per policy call (OpenPI's LIBERO client: 5 of 10)
    action_dim: int = 4
    max_token_len: int = 16
    max_steps: int = 200  # a policy episode's step limit (the experts need 19-92)
    expert_steps: int = 500  # an expert episode's (Meta-World's own limit)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch


# --- the simulator -----------------------------------------------------------------------------------


def require_rendering() -> None:
    """MuJoCo renders headless here, or a `SuiteError` says what to install."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    if os.environ["MUJOCO_GL"] == "egl":
        os.environ.setdefault("EGL_PLATFORM", "surfaceless")
    elif os.environ["MUJOCO_GL"] == "osmesa":
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    try:
        import metaworld  # noqa: F401
        import mujoco
    except ImportError as error:
        raise SuiteError(f"the Meta-World suite needs {error.name}: pip install 'openpi-prune[metaworld]'") from None
    try:
        context = mujoco.GLContext(8, 8)
        context.make_current()
        context.free()
    except Exception as error:  # noqa: BLE001 - any failure here is a missing system library
        raise SuiteError(
            f"MuJoCo cannot render headless with MUJOCO_GL={os.environ['MUJOCO_GL']} ({type(error).__name__}: "
            f"{error}). Install the libraries: {INSTALL}"
        ) from None


def episode_cache(spec: MetaWorldSpec) -> pathlib.Path:
    """Where the expert episodes of `spec` are kept unless told otherwise: in the user's cache, not in a
    checkout (rendering them takes about an hour on 2 cores, and a fresh clone would start again),
    under a digest of what shapes an episode (tasks and seeds are its folders and files)."""
    # "seeded": episodes made before each reset seed fixed its scene are other episodes.
    shaping = (
        spec.image_size,
        spec.expert_steps,
        tuple(CAMERAS.items()),
        importlib.metadata.version("metaworld"),
        "seeded",
    )
    digest = hashlib.blake2b(repr(shaping).encode(), digest_size=6).hexdigest()
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    return cache / "openpi-prune" / "metaworld-episodes" / digest


def make_env(task: str, spec: MetaWorldSpec, seed: int):
    """The task's environment for reset seed `seed`. MT1 draws its object positions when it is made
    and picks one of them at reset; unseeded, both draws differ from one process to the next, so the
    seed is given to both: each reset seed is one scene, the same on every run and machine."""
    import gymnasium as gym
    import metaworld  # noqa: F401  (registers its environments with Gymnasium)

    if task not in TASKS:
        raise SuiteError(f"unknown task {task!r}; the suite's tasks: {', '.join(TASKS)}")
    return gym.make(
        "Meta-World/MT1",
        env_name=task,
        seed=seed,
        render_mode="rgb_array",
        camera_name=CAMERAS["base_0_rgb"],
        width=spec.image_size,
        height=spec.image_size,
    )


def object_position(task: str, seed: int, spec: MetaWorldSpec) -> np.ndarray:
    """Where reset seed `seed` puts the task's object (x, y, z in metres; the window's handle, the
    drawer's, ...): what the policy must read from the images. Nothing is rendered."""
    env = make_env(task, spec, seed)
    try:
        return np.asarray(env.reset(seed=seed)[0][4:7], np.float64)
    finally:
        env.close()


def frames(env) -> dict[str, np.ndarray]:
    """Both cameras' images of the current state, uint8 [224, 224, 3]."""
    import mujoco

    unwrapped = env.unwrapped
    images = {}
    for camera, name in CAMERAS.items():
        unwrapped.mujoco_renderer.camera_id = mujoco.mj_name2id(unwrapped.model, mujoco.mjtObj.mjOBJ_CAMERA, name)
        images[camera] = np.ascontiguousarray(env.render())
    return images


def expert(task: str):
    from metaworld import policies

    name = "Sawyer" + "".join(w.capitalize() for w in task.removesuffix("-v3").split("-")) + "V3Policy"
    return getattr(policies, name)()


def expert_episode(task: str, seed: int, spec: MetaWorldSpec) -> dict[str, np.ndarray]:
    """The expert from reset seed `seed` until success or `max_steps`: images, state and the action
    taken at every step (clipped to the action space, as the simulator applies it)."""
    env = make_env(task, spec, seed)
    try:
        policy, (obs, _) = expert(task), env.reset(seed=seed)
        record = {camera: [] for camera in CAMERAS} | {"state": [], "actions": []}
        success = False
        for _ in range(spec.expert_steps):
            for camera, image in frames(env).items():
                record[camera].append(image)
            action = np.clip(policy.get_action(obs), -1, 1)
            record["state"].append(obs[:4])
            record["actions"].append(action)
            obs, _, _, _, info = env.step(action)
            if info["success"]:
                success = True
                break
    finally:
        env.close()
    episode = {k: np.asarray(v) for k, v in record.items()}
    return episode | {"success": np.asarray(success)}


def _collect_one(task: str, seed: int, spec: MetaWorldSpec, path: pathlib.Path) -> None:
    """One expert episode to `path`, written whole or not at all (an interrupted run redoes it)."""
    require_rendering()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        np.savez_compressed(file, **expert_episode(task, seed, spec))
    partial.replace(path)


def collect(
    spec: MetaWorldSpec, progress=None, workers: int | None = None, seeds: range | None = None
) -> dict[str, int]:
    """Expert episodes of every task on `seeds` (default: the train seeds 0..train_seeds-1), cached;
    returns the number of successful episodes per task (a failed one is kept on disk and not trained
    on). Missing ones are rendered by `workers` processes (default: one per core; MuJoCo renders on
    one core)."""
    require_rendering()
    root = pathlib.Path(spec.episodes_dir)
    seeds = range(spec.train_seeds) if seeds is None else seeds
    wanted = [(task, seed, root / task / f"{seed}.npz") for task in spec.tasks for seed in seeds]
    missing = [item for item in wanted if not item[2].exists()]
    bar = (
        progress.add_task("expert episodes", total=len(wanted), completed=len(wanted) - len(missing))
        if progress
        else None
    )
    if missing:
        workers = max(1, min(workers or os.cpu_count() or 1, len(missing)))
        # Fresh processes (not forks of one that may hold JAX's threads or a GL context).
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(_collect_one, task, seed, spec, path): task for task, seed, path in missing}
            for future in concurrent.futures.as_completed(futures):
                future.result()
                if progress:
                    progress.update(bar, advance=1, description=f"expert episodes: {futures[future]}")
    solved = dict.fromkeys(spec.tasks, 0)
    for task, _, path in wanted:
        with np.load(path) as episode:
            solved[task] += bool(episode["success"])
    return solved


# --- what the policy sees ------------------------------------------------------------------------------


def word_id(word: str) -> int:
    low, high = WORD_TOKENS
    return low + zlib.crc32(word.encode()) % (high - low)


def prompt_tokens(task: str, state: np.ndarray, spec: MetaWorldSpec) -> tuple[np.ndarray, np.ndarray]:
    """The instruction's words, then the state's bins, padded to `max_token_len`."""
    words = [word_id(w) for w in TASKS[task].split()]
    share = (np.asarray(state[:4], np.float64) - STATE_LOW) / (STATE_HIGH - STATE_LOW)
    bins = np.clip((share * STATE_BINS).astype(int), 0, STATE_BINS - 1)
    ids = words + [STATE_TOKENS + int(b) for b in bins]
    if len(ids) > spec.max_token_len:
        raise SuiteError(f"the prompt of {task!r} needs {len(ids)} tokens; max_token_len is {spec.max_token_len}")
    tokens = np.zeros(spec.max_token_len, np.int32)
    tokens[: len(ids)] = ids
    return tokens, np.arange(spec.max_token_len) < len(ids)


def policy_inputs(spec: MetaWorldSpec):
    """OpenPI input transform: the robot's message (`observation/image`, `observation/wrist_image`,
    `observation/state`, `task`) as the model's inputs."""

    def transform(data: dict) -> dict:
        image, wrist = np.asarray(data["observation/image"]), np.asarray(data["observation/wrist_image"])
        if data.get("task") not in TASKS:
            raise SuiteError(f"unknown task {data.get('task')!r}; the suite's tasks: {', '.join(TASKS)}")
        tokens, mask = prompt_tokens(data["task"], np.asarray(data["observation/state"]), spec)
        return {
            "image": {"base_0_rgb": image, "left_wrist_0_rgb": wrist, scenes.MASKED_CAMERA: np.zeros_like(image)},
            "image_mask": {camera: np.asarray(camera in CAMERAS) for camera in [*CAMERAS, scenes.MASKED_CAMERA]},
            "state": np.zeros(spec.action_dim, np.float32),  # pi0.5 takes the state as tokens (above)
            "tokenized_prompt": tokens,
            "tokenized_prompt_mask": mask,
        }

    return transform


def policy_outputs(data: dict) -> dict:
    return {**data, "actions": np.clip(np.asarray(data["actions"]), -1, 1)}


# --- training batches (the lab's scene-family interface) ----------------------------------------------

_episodes: dict = {}


def episodes(spec: MetaWorldSpec) -> list[tuple[str, int, dict]]:
    """The cached successful expert episodes (loaded once per process)."""
    key = (spec.episodes_dir, spec.tasks, spec.train_seeds)
    if key not in _episodes:
        loaded = []
        for task in spec.tasks:
            for seed in range(spec.train_seeds):
                path = pathlib.Path(spec.episodes_dir) / task / f"{seed}.npz"
                if not path.exists():
                    raise SuiteError(
                        f"no expert episode at {path}: run `openpi-prune metaworld` (it collects them first)"
                    )
                with np.load(path) as episode:
                    if bool(episode["success"]):
                        loaded.append((task, seed, {k: episode[k] for k in episode.files}))
        if not loaded:
            raise SuiteError(f"no expert episode in {spec.episodes_dir} succeeded: nothing to train on")
        _episodes[key] = loaded
    return _episodes[key]


def forget_episodes() -> None:
    """Drop the loaded expert episodes (`episodes` loads them again when asked) and hand their memory
    back to the system."""
    _episodes.clear()
    gc.collect()
    # Once batches have been drawn, glibc keeps freed 12 MB frames in its heap rather than unmapping
    # them: without a trim the process stays as large as before.
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None  # glibc only
    if trim is not None:
        trim(0)


def _sample(spec: MetaWorldSpec, rng, batch_size: int) -> list[tuple[str, int, int, dict]]:
    pool = episodes(spec)
    picks = []
    for _ in range(batch_size):
        task, seed, episode = pool[int(rng.integers(len(pool)))]
        picks.append((task, seed, int(rng.integers(len(episode["actions"]))), episode))
    return picks


def layouts(seed: int, batch_size: int, spec: MetaWorldSpec, objects=None, split: str | None = "train") -> list:
    """(task, reset seed) of each sample `render` draws: training never uses a test reset seed."""
    return [(task, reset) for task, reset, _, _ in _sample(spec, np.random.default_rng(seed), batch_size)]


def render(seed: int, batch_size: int, spec: MetaWorldSpec, objects=None, split: str | None = "train") -> scenes.Batch:
    """A batch of `batch_size` steps drawn from the training episodes (`steps_batch`)."""
    if split not in ("train", None):
        raise SuiteError("Meta-World's held-out data are reset seeds, measured in closed loop, not batches")
    return steps_batch(_sample(spec, np.random.default_rng(seed), batch_size), spec)


def validation_batch(spec: MetaWorldSpec, seeds: range, every: int = 3) -> scenes.Batch:
    """Every `every`-th step of the successful expert episodes on validation reset `seeds` (rendered
    by `collect`), as one batch."""
    picks = []
    for task in spec.tasks:
        for reset in seeds:
            with np.load(pathlib.Path(spec.episodes_dir) / task / f"{reset}.npz") as file:
                episode = {k: file[k] for k in file.files}
            if bool(episode["success"]):
                picks += [(task, reset, step, episode) for step in range(0, len(episode["actions"]), every)]
    return steps_batch(picks, spec)


def steps_batch(picks: list[tuple[str, int, int, dict]], spec: MetaWorldSpec) -> scenes.Batch:
    """(task, reset seed, step, episode) picks as a batch: both images, the prompt with the state, and
    the next `horizon` actions (the last repeated past the episode's end)."""
    batch_size, size = len(picks), spec.image_size
    images = {camera: np.zeros((batch_size, size, size, 3), np.float32) for camera in [*CAMERAS, scenes.MASKED_CAMERA]}
    tokens = np.zeros((batch_size, spec.max_token_len), np.int32)
    token_mask = np.zeros((batch_size, spec.max_token_len), bool)
    actions = np.zeros((batch_size, spec.horizon, spec.action_dim), np.float32)
    for i, (task, _, step, episode) in enumerate(picks):
        for camera in CAMERAS:
            images[camera][i] = episode[camera][step].astype(np.float32) / 127.5 - 1.0
        tokens[i], token_mask[i] = prompt_tokens(task, episode["state"][step], spec)
        ahead = np.minimum(np.arange(step, step + spec.horizon), len(episode["actions"]) - 1)
        actions[i] = episode["actions"][ahead]
    return scenes.Batch(
        images=images,
        image_masks={camera: np.full(batch_size, camera != scenes.MASKED_CAMERA) for camera in images},
        tokens=tokens,
        token_mask=token_mask,
        actions=actions,
        target_mask=np.zeros((batch_size, 3 * spec.grid**2), bool),  # no known target patches here
        target=np.asarray([list(spec.tasks).index(task) for task, *_ in picks], np.int32),
        layouts=tuple((task, reset) for task, reset, _, _ in picks),
    )


# --- closed loop, through OpenPI's server and client ---------------------------------------------------


def make_policy(model, spec: MetaWorldSpec):
    from openpi.policies import policy as _policy

    return _policy.Policy(
        model,
        transforms=[policy_inputs(spec)],
        output_transforms=[policy_outputs],
        sample_kwargs={"num_steps": 10},
    )


@contextlib.contextmanager
def serve(policy):
    """OpenPI's `WebsocketPolicyServer` on a free loopback port, on a thread; yields the
    `openpi-client` policy connected to it."""
    import asyncio

    from openpi.serving import websocket_policy_server
    from openpi_client import websocket_client_policy

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = websocket_policy_server.WebsocketPolicyServer(policy, host="127.0.0.1", port=port)
    loop = asyncio.new_event_loop()
    serving = loop.create_task(server.run())

    def serve_until_cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(serving)
        loop.close()

    thread = threading.Thread(target=serve_until_cancelled, daemon=True)
    thread.start()
    # This openpi-client connects once, without retrying: wait until the server listens.
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or not thread.is_alive():
                raise SuiteError(f"OpenPI's policy server did not start on port {port}") from None
            time.sleep(0.05)
    try:
        client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)
        # OpenPI's server runs `infer` on its event loop, so it answers no keepalive ping while a call
        # compiles; on a busy machine that outlasts websockets' 20 s and the client would hang up.
        client._ws.ping_timeout = None
        yield client
    finally:
        loop.call_soon_threadsafe(serving.cancel)
        thread.join(timeout=30)


def closed_loop(client, task: str, seed: int, spec: MetaWorldSpec, blank: bool = False, record: bool = False) -> dict:
    """One episode driven by the served policy: success, steps, each call's wall time (the client
    waits for the actions), the kept tokens per camera the server reported, and if asked, at every
    call, the frames the policy saw with the slots it kept and those of them holding a merged region's
    mean (None unpruned)."""
    env = make_env(task, spec, seed)
    try:
        obs, _ = env.reset(seed=seed)
        calls, kept, shown = [], [], []
        success, chunk, steps = False, [], 0
        while steps < spec.max_steps and not success:
            if not chunk:
                images = frames(env)
                if blank:
                    images = {k: np.zeros_like(v) for k, v in images.items()}
                message = {
                    "observation/image": images["base_0_rgb"],
                    "observation/wrist_image": images["left_wrist_0_rgb"],
                    "observation/state": np.asarray(obs[:4], np.float32),
                    "task": task,
                }
                started = time.perf_counter()
                response = client.infer(message)
                calls.append(time.perf_counter() - started)
                pruning = response.get("pruning")
                if pruning is not None:
                    kept.append(np.asarray(pruning["kept_per_camera"]).tolist())
                if record:  # what the policy saw, the slots it kept of each camera, and which hold a merge
                    if pruning is None:
                        shown.append((images, None, None))
                    else:
                        slots = (np.asarray(pruning[k])[: len(CAMERAS)] for k in ("kept_patches", "merged_patches"))
                        shown.append((images, *slots))
                chunk = list(np.asarray(response["actions"])[: spec.replan])
            obs, _, _, _, info = env.step(chunk.pop(0))
            steps += 1
            success = bool(info["success"])
    finally:
        env.close()
    return {"success": success, "steps": steps, "call_seconds": calls, "kept_per_camera": kept, "frames": shown}
