"""An adapter merged into its base: a standalone transformers model directory that plain transformers loads."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from lorakit.errors import ExportError
from lorakit.io_utils import nearest_existing, private_dir_made_ordinary


def check_out_dir(adapter: str | os.PathLike, out: str | os.PathLike, force: bool, holds: str = "config.json",
                  kind: str = "model", command: str = "merge") -> None:
    """Fail before loading anything when `out` could not be written, or replacing it would destroy something.

    `holds`: the file an earlier export of this `kind` left in `out`; only such a directory is replaced (`force`).
    """
    adapter_dir, out_dir = Path(adapter).resolve(), Path(out).resolve()
    if out_dir == adapter_dir or out_dir in adapter_dir.parents or adapter_dir in out_dir.parents:
        where = ("is" if out_dir == adapter_dir else "contains" if out_dir in adapter_dir.parents else "is inside")
        raise ExportError(f"--out {out} {where} the adapter directory {adapter}; the export would replace or mix "
                          "with the adapter and its checkpoints. Choose an --out outside it.")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out} is a file; {command} writes a {kind} directory there. Choose another --out.")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise ExportError(f"{out} exists and is not empty; pass --force to replace it")
        if not (out_dir / holds).is_file():
            raise ExportError(f"--out {out} is not empty and holds no {kind} (no {holds}); --force replaces only an "
                              f"earlier {kind}. Choose another --out or empty it.")
    existing = nearest_existing(out_dir.parent)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out}: {existing} is not writable by this user. Choose another --out, "
                          "or fix its permissions.")


def replace_dir_atomically(out: Path, write) -> None:
    """Call `write(tmp)` on a new directory beside `out`, then put it in place of `out` in one rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        private_dir_made_ordinary(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge_to_directory(adapter: str, out: str, base: Optional[str] = None, force: bool = False) -> str:
    """Merge the adapter into the base it was trained on (NF4-rounded for QLoRA) and save the result to `out`;
    returns the base's name."""
    from lorakit.adapter_folder import check_adapter_dir
    from lorakit.models import load_with_adapters

    check_adapter_dir(adapter)
    check_out_dir(adapter, out, force)
    model, tokenizer, _, base = load_with_adapters(base, [adapter])
    merged = model.merge_and_unload()

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    replace_dir_atomically(Path(out), write)
    return base
