"""Training: the height decoder on lidar CHM chips (``canopy train``), and the GEDI correction.

Modules, ground floor first: ``losses`` (SiLog, L1, GEDI footprint loss; torch only),
``augment`` (dihedral + photometric, image and labels together), ``datasets`` (chips from the
catalog sampler or synthetic scenes, in memory, deterministic), ``cosub`` (submodel co-training),
``loop`` (the training loop), ``cli`` (the command), ``default_model`` (reproduces the bundled
default model). ``--backbone FILE`` weights are read by ``ssl_backbone.checkpoints``, and the
processes/RNG/schedule/checkpoint runtime is ``ssl_backbone.runtime``. Nothing heavy is
imported here.
"""

__all__ = ["TrainConfig", "DataSpec", "build_data", "train"]


def __getattr__(name):  # lazy: `import canopy.train.losses` should not pull in the whole loop
    if name in ("TrainConfig", "train"):
        from canopy.train import loop

        return getattr(loop, name)
    if name in ("DataSpec", "build_data"):
        from canopy.train import datasets

        return getattr(datasets, name)
    raise AttributeError(name)
