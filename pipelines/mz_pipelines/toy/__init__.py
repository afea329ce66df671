"""Toy domain: the reference domain of the pipeline runtime (:mod:`mz_pipelines.runtime`).

A tiny diagonal-SSM regressor on synthetic sequences, small enough to train in seconds on a CPU,
wired through every part of the runtime: typed config (``config.py``), data files with validated
formats (``data.py``), the model with its recurrence kept in float32 (``model.py``), the engine
plug-in (``task.py``) and the verbs (``cli.py``)::

    mambazoo toy synth --out data/toy
    mambazoo toy train --set data.path=data/toy run.name=a
    mambazoo toy evaluate --set run.name=a
    mambazoo toy predict --set run.name=a --input data/toy/val.npz --output pred.npy
    mambazoo toy bench --lengths 64 256
    torchrun --nproc_per_node=2 -m mz_pipelines.toy train --set run.name=ddp

New domains copy this layout.
"""
