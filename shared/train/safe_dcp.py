"""Loading a ``torch.distributed.checkpoint`` folder that came from the artifact store, without pickle's reach.

The FSDP resume reads the sharded optimizer state with ``dcp.load``. Out of the box that
unpickles the folder's ``.metadata`` (``pickle.load``) and every non-tensor item
(``torch.load(weights_only=False)``): a checkpoint someone wrote into the store would run their
code in the finetune job. Here, before anything is read:

1. every file of the folder is checked against the checkpoint's ``MANIFEST.json`` (the copy
   ``fetch_dir`` leaves beside the files it verified): a file it does not list, or whose size or
   sha256 differs, is refused (IntegrityError, exit 2, naming the file); so are folders without
   a manifest;
2. ``.metadata`` is read by an unpickler that builds only DCP's own metadata classes, ``torch.Size``
   and torch's dtype/layout/memory-format constants, and refuses any other global by name;
3. non-tensor items (the optimizer's hyperparameters) load with ``weights_only=True``.

The trust boundary, then: write access to ``runs/<id>/finetune/checkpoints/`` lets a writer choose
the optimizer state a resumed run continues from (numbers), never code it runs. Step 1 binds the
files to the manifest committed with them; the manifest itself is as trustworthy as the store.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any

import torch

from shared.core.errors import IntegrityError
from shared.store.artifacts import MANIFEST, Manifest, verify_file

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)
_ALSO = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("collections", "OrderedDict")}


def verify_folder(checkpoint: Path, sub: str) -> None:
    """Every file under ``checkpoint/sub`` is one the checkpoint's manifest lists, with its size and sha256."""
    checkpoint = Path(checkpoint)
    source = f"checkpoint {checkpoint}"
    try:
        manifest = Manifest.model_validate_json((checkpoint / MANIFEST).read_bytes())
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{source} has no readable {MANIFEST} ({exc}); only a verified checkpoint is loaded") from exc
    listed = {e.path: e for e in manifest.files if e.path.startswith(f"{sub}/")}
    present = {p.relative_to(checkpoint).as_posix() for p in (checkpoint / sub).rglob("*") if p.is_file()}
    if unlisted := sorted(present - set(listed)):
        raise IntegrityError(f"{source}/{unlisted[0]} is not in its {MANIFEST}; refused")
    if missing := sorted(set(listed) - present):
        raise IntegrityError(f"{source}/{missing[0]} is listed in its {MANIFEST} but missing")
    for rel, entry in listed.items():
        verify_file(checkpoint / rel, entry, source)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES:
            value = getattr(importlib.import_module(module), name, None)
            if isinstance(value, type) and value.__module__ == module:  # its dataclasses and enums
                return value
        elif module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
            return getattr(torch, name)
        elif (module, name) in _ALSO:
            return super().find_class(module, name)
        raise IntegrityError(f"checkpoint metadata names {module}.{name}, which a DCP checkpoint never holds; refused")


def read_metadata(path: Path):
    with open(path, "rb") as fh:
        return _MetadataUnpickler(fh).load()


def _reader(folder: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(str(folder))


def _planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            # DefaultLoadPlanner's own, with weights_only=True (it passes False): an optimizer's
            # non-tensor items are numbers, strings and tuples.
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise IntegrityError(f"checkpoint item {read_item.dest_index.fqn} is not plain data "
                                     f"({str(exc).splitlines()[-1].strip()}); refused") from exc
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return Planner()


def load(state: dict[str, Any], checkpoint: Path, sub: str) -> None:
    """``dcp.load(state)`` from ``checkpoint/sub``, after verify_folder, with the restricted readers above."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    folder = Path(checkpoint) / sub
    verify_folder(checkpoint, sub)
    read_metadata(folder / ".metadata")  # refused here, before DCP wraps the error in its own
    try:
        dcp.load(state, storage_reader=_reader(folder), planner=_planner())
    except CheckpointException as exc:  # a BaseException: give the caller ours, one line
        refused = [e for e, _ in exc.failures.values() if isinstance(e, IntegrityError)]
        if refused:
            raise refused[0] from None
        raise
