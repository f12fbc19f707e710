"""Pruned twins of OpenPI's pi0 / pi0.5 training configs, known to its own `get_config` and `cli()`.

Every `TrainConfig` in OpenPI's registry whose model is a `Pi0Config` gets a twin named
`<name>_prune`, registered when `openpi.training.config` is imported (the start-up hook arranges
that after `pip install openpi-prune`, with no variable set). A twin's model is a `PrunedPi0Config`:
OpenPI's `Pi0Config` plus the pruning settings, which it turns on when it creates or loads a model,
so choosing the twin is all it takes. OpenPI's command line reaches them as any field:
`--model.prune.keep-fraction 0.3`. A twin reads its base config's norm-stats assets and keeps its
weight loader; checkpoints go under the twin's own name. A twin of a LIBERO config drops the right
wrist camera, which OpenPI's LIBERO inputs always mask for pi0 / pi0.5 (`UNUSED_CAMERAS`).
"""

import dataclasses
import pathlib

from openpi.models import pi0_config

import openpi_prune
from openpi_prune.errors import PruneInputError
from openpi_prune.hookspecs import PARAMETER_PREFIX
from openpi_prune.settings import PruneSettings

SUFFIX = "_prune"


@dataclasses.dataclass(frozen=True)
class PrunedPi0Config(pi0_config.Pi0Config):
    """OpenPI's pi0 / pi0.5 model config, pruned with `prune` from the moment a model is made."""

    prune: PruneSettings = dataclasses.field(default_factory=PruneSettings)

    def create(self, rng):
        openpi_prune.enable(self.prune)  # before Pi0.__init__: the method adds its parameters there
        return super().create(rng)

    def load(self, params, *, remove_extra_params: bool = True):
        openpi_prune.enable(self.prune)
        return super().load(params, remove_extra_params=remove_extra_params)

    def load_pytorch(self, train_config, weight_path: str):
        openpi_prune.enable(self.prune)  # before PI0Pytorch.__init__, as for `create`
        return super().load_pytorch(train_config, weight_path)


def _not_pruner(path, value) -> bool:
    return not any(str(part).startswith(PARAMETER_PREFIX) for part in path)


def with_pruning(config, name: str | None = None, *, train_only_pruner: bool = False, **settings):
    """A pruned twin of the `TrainConfig` `config` (named `<name>_prune` unless `name` is given),
    pruning with `PruneSettings(**settings)`; on a twin, the settings change.
    `train_only_pruner` freezes every parameter but the method's own (OpenPI's `freeze_filter`)."""
    if train_only_pruner:
        from flax import nnx

        config = dataclasses.replace(config, freeze_filter=nnx.All(nnx.Param, _not_pruner))
    model = config.model
    if not isinstance(model, pi0_config.Pi0Config):
        raise PruneInputError(
            f"config {config.name!r} has a {type(model).__name__} model; openpi-prune prunes pi0 / pi0.5 "
            "(Pi0Config) models only."
        )
    if isinstance(model, PrunedPi0Config):
        pruned = dataclasses.replace(model, prune=model.prune.replace(**settings))
        return dataclasses.replace(config, name=name or config.name, model=pruned)
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.init}
    pruned = PrunedPi0Config(**fields, prune=PruneSettings(**settings))
    data = config.data
    assets = getattr(data, "assets", None)
    if assets is not None and assets.assets_dir is None:
        # The base config's norm stats: OpenPI looks under assets_base_dir / <config name>.
        base_assets = str(pathlib.Path(config.assets_base_dir) / config.name)
        data = dataclasses.replace(data, assets=dataclasses.replace(assets, assets_dir=base_assets))
    return dataclasses.replace(config, name=name or config.name + SUFFIX, model=pruned, data=data)


# Cameras a config's inputs always mask for pi0 / pi0.5, by the name of its data config: its twin
# leaves them out of the prefix (`drop_cameras`), SigLIP pass included.
UNUSED_CAMERAS = {
    # OpenPI's LiberoInputs: the right wrist is a zero image, masked unless the model is pi0-FAST.
    "LeRobotLiberoDataConfig": ("right_wrist_0_rgb",),
}


def register(module) -> list[str]:
    """Add a twin of each pi0 / pi0.5 config to OpenPI's registry (`module`: `openpi.training.config`).
    Returns the twins' names. Idempotent."""
    added = []
    for config in list(module._CONFIGS):
        if not isinstance(config.model, pi0_config.Pi0Config) or isinstance(config.model, PrunedPi0Config):
            continue
        twin = with_pruning(config, drop_cameras=UNUSED_CAMERAS.get(type(config.data).__name__, ()))
        if twin.name in module._CONFIGS_DICT:
            continue
        module._CONFIGS.append(twin)
        module._CONFIGS_DICT[twin.name] = twin
        added.append(twin.name)
    return added
