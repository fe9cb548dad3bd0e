"""An example input for profiling and checks, taken from what Lightning itself will iterate.

Every way Lightning accepts data works: a datamodule (positional or ``datamodule=``), the module's
own ``*_dataloader`` hooks, ``train_dataloaders=``/``val_dataloaders=`` of ``fit``,
``dataloaders=`` of ``validate``/``test``/``predict``, and iterables other than DataLoader.
Nothing the training will iterate is consumed: a DataLoader over a map-style dataset is sampled by
collating its first samples directly (no iterator, no worker, no sampler draw), any other source is
read from a fresh iterator with the global random states restored afterwards, and a one-shot
iterator (which a peek would consume) is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_distnn._compat import data_source, preserved_rng

HOOKS = ("train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader")
STAGES = {"fit": "fit", "validate": "validate", "test": "test", "predict": "predict", "sanity_check": "fit"}

#: what the error names when no example exists
ENTRY_POINTS = (
    "`self.example_input_array` in the LightningModule, "
    "trainer.fit(model, train_dataloaders=...) / trainer.fit(model, datamodule=...), "
    "trainer.validate/test/predict(model, dataloaders=...) with a non-empty loader, "
    "or the module's *_dataloader hooks"
)


def _inputs(batch: Any) -> Optional[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                return value
    return None


def _first_loader(source: Any) -> Any:
    """One loader of a source that may hold several (a list, tuple or dict of loaders)."""
    if isinstance(source, Mapping):
        return next(iter(source.values()), None)
    if isinstance(source, (list, tuple)) and source and not isinstance(source[0], torch.Tensor):
        first = source[0]
        if isinstance(first, (DataLoader, Iterable)) and not isinstance(first, (list, tuple, torch.Tensor)):
            return first
    return source


def peek_inputs(source: Any) -> Optional[torch.Tensor]:
    """The inputs of the first batch of ``source`` without consuming anything (``None`` if impossible)."""
    source = _first_loader(source)
    if source is None:
        return None
    if isinstance(source, DataLoader) and not isinstance(source.dataset, IterableDataset):
        dataset = source.dataset
        try:
            size = len(dataset)
        except TypeError:
            size = 0
        if size == 0:
            return None
        take = min(size, source.batch_size or 1)
        collate = source.collate_fn
        with preserved_rng():
            return _inputs(collate([dataset[i] for i in range(take)]))
    if isinstance(source, Iterator) or not isinstance(source, Iterable):
        return None  # a one-shot iterator: peeking would eat the first batch
    with preserved_rng():
        try:
            return _inputs(next(iter(source)))
        except StopIteration:
            return None


def example_inputs(trainer, module) -> Optional[torch.Tensor]:
    """A batch of inputs for ``module`` under ``trainer``'s current entry point, or ``None``.

    Order: ``module.example_input_array``; what Lightning will iterate for the current stage; the
    training loader; the datamodule's and the module's ``*_dataloader`` hooks.
    """
    example = getattr(module, "example_input_array", None)
    if isinstance(example, torch.Tensor):
        return example
    stage = STAGES.get(getattr(getattr(trainer.state, "fn", None), "value", None) or "", "fit")
    for name in dict.fromkeys((stage, "fit", "validate", "test", "predict")):
        x = peek_inputs(data_source(trainer, name))
        if x is not None:
            return x
    sources = [s for s in (getattr(trainer, "datamodule", None), module) if s is not None]
    for source in sources:
        for hook in HOOKS:
            fn = getattr(source, hook, None)
            if not callable(fn):
                continue
            try:
                loader = fn()
            except Exception:  # noqa: BLE001 - a hook that is not implemented or not set up yet
                continue
            x = peek_inputs(loader)
            if x is not None:
                return x
    return None
