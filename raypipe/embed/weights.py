"""Load checkpoint weight files as plain state dicts, never by a full unpickle.

``.bin`` / ``.pt`` files (``torch.save`` pickles, as LangCell ships ``cell_proj.bin``,
``text_proj.bin``, ``ctm_head.bin`` and Hugging Face ``pytorch_model.bin``) are read only with
``torch.load(path, weights_only=True)``: torch's restricted unpickler admits tensors and plain
containers and refuses anything else (a class instance, ``os.system``, ``builtins.open``)
before it runs. ``.safetensors`` files hold no code at all. Whatever loads must be a mapping of
names to tensors; anything else is refused with an error naming the file.

``torch`` is imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from raypipe.errors import InputError

__all__ = ["WEIGHT_SUFFIXES", "find_weight_file", "load_state_dict_file"]

#: accepted suffixes of a weight file, in order of preference (no code can hide in safetensors)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def find_weight_file(folder: Path, stem: str) -> Path | None:
    """Return ``folder/<stem><suffix>`` for the first suffix of :data:`WEIGHT_SUFFIXES` present."""
    return next(
        (folder / f"{stem}{s}" for s in WEIGHT_SUFFIXES if (folder / f"{stem}{s}").is_file()), None
    )


def load_state_dict_file(path: str | Path, *, what: str = "weights") -> dict[str, Any]:
    """Read a weight file as a ``{name: tensor}`` state dict on the CPU.

    Parameters
    ----------
    path
        A ``.safetensors`` file, or a ``torch.save`` pickle (``.bin``/``.pt``) read with
        ``torch.load(weights_only=True)``.
    what
        What the file is, for error messages (e.g. ``"LangCell ctm_head"``).

    Returns
    -------
    dict
        Parameter name → ``torch.Tensor``.

    Raises
    ------
    InputError
        The file is missing, unreadable, refused by the restricted unpickler, or not a
        mapping of names to tensors.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} file {p} does not exist", fix="check the checkpoint folder")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/safetensors raise many types for bad files
        raise InputError(
            f"{what} file {p} is not a plain state dict; refused without running it "
            f"(torch.load(weights_only=True) / safetensors: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})",
            fix="save the weights with torch.save(module.state_dict(), path) or as safetensors",
        ) from e
    _check_plain(state, p, what)
    return dict(state)


def _check_plain(state: Any, path: Path, what: str) -> None:
    import torch

    if not isinstance(state, dict) or not state:
        raise InputError(
            f"{what} file {path} holds a {type(state).__name__}, not a state dict of tensors",
            fix="save the weights with torch.save(module.state_dict(), path)",
        )
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(
            f"{what} file {path} is not a plain state dict: entries {_names(bad)} are not "
            "name → tensor",
            fix="save the weights with torch.save(module.state_dict(), path)",
        )


def _names(keys: Sequence[object], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")
