"""Your own ``LightningDataModule`` as a run's data, named by ``class_path`` with
``init_args`` as LightningCLI does::

    data:
      class_path: my_pkg.data.MyDataModule
      init_args: {batch_size: 64, root: /data/x}

The class is imported from exactly that module (only because the run file names it), built
with ``init_args``, and its ``prepare_data()``/``setup("fit")``/``setup("test")`` run once. Its
``train_dataloader()``, ``val_dataloader()`` (optional) and ``test_dataloader()`` (or the
validation loader when it has none) are what the run trains and evaluates on; batches are
``(x, y)``. The number of classes is the module's ``num_classes`` attribute; the model's input
shape comes from the first test batch.
"""

from __future__ import annotations

from ..class_path import import_class
from .bundle import DataBundle

def _loader(dm, stage: str):
    """The module's ``<stage>_dataloader()``, or None when it does not define one (Lightning's
    default raises)."""
    import lightning.pytorch as pl

    name = f"{stage}_dataloader"
    if getattr(type(dm), name) is getattr(pl.LightningDataModule, name):
        return None
    return getattr(dm, name)()


def datamodule_bundle(spec: dict, batch_size: int = 128) -> DataBundle:
    """The :class:`DataBundle` of a ``data: {class_path, init_args}`` section."""
    import lightning.pytorch as pl

    cls = import_class(spec["class_path"], "data.class_path")
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningDataModule)):
        raise ValueError(f"data.class_path={spec['class_path']!r} is not a LightningDataModule")
    try:
        dm = cls(**dict(spec.get("init_args") or {}))
    except TypeError as e:
        raise ValueError(f"data.init_args: {cls.__name__}(...) failed: {e}") from None
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    train, val, test = _loader(dm, "train"), _loader(dm, "val"), _loader(dm, "test")
    if train is None:
        raise ValueError(f"data.class_path: {cls.__name__} has no train_dataloader()")
    test = test if test is not None else val
    if test is None:
        raise ValueError(f"data.class_path: {cls.__name__} has neither test_dataloader() nor "
                         "val_dataloader() to evaluate on")
    num_classes = getattr(dm, "num_classes", None)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"data.class_path: {cls.__name__} must have an integer attribute "
                         f"num_classes (the model's number of outputs), got {num_classes!r}")
    x = next(iter(test))[0]
    return DataBundle(train=train, val=val, test=test, num_classes=num_classes,
                      classes=[str(c) for c in range(num_classes)],
                      input_shape=tuple(int(d) for d in x.shape[1:]), mean=(), std=(),
                      example_input=x[:8].detach().cpu().float(),
                      batch_size=int(getattr(dm, "batch_size", batch_size) or batch_size))


__all__ = ["datamodule_bundle"]
