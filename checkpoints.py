"""Checkpoints: crash-safe writing, loading without executing code, and mapping weights
between models (resume, evaluation, finetuning from DeiT/timm or MTViT weights)."""
import argparse
import math
import os
import pickle
import re
import shutil
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from atomic_write import replacing
from multi_scale import POOL
from utils import BYTES_PER_MB, MachineError, is_disk_full, is_main_process

# Weights a finetuning source must provide: everything but the head and position embeddings.
BACKBONE_PREFIXES = ('patch_embed.', 'blocks.', 'cls_token', 'norm.')


class CheckpointError(Exception):
    """A checkpoint file is missing, unreadable, or unsafe to load."""


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nest of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(value) for value in obj)
    return 0


def save_checkpoint_atomic(obj: Any, path: Union[str, os.PathLike]) -> None:
    """Write ``obj`` with torch.save so that ``path`` is never left half-written.

    Only the main process writes, through ``replacing``: until the new file is complete and
    fsynced any previous file at ``path`` stays intact. A full disk is a MachineError saying so.
    """
    if not is_main_process():
        return
    path = os.fspath(path)
    try:
        with replacing(path) as staged, open(staged, "wb") as handle:
            torch.save(obj, handle)
    except BaseException as error:
        if not is_disk_full(error):
            raise
        directory = os.path.dirname(os.path.abspath(path))
        kept = ('the previous checkpoint there is intact' if os.path.exists(path)
                else 'nothing was saved')
        raise MachineError(
            f'no space left on device writing {path} (about '
            f'{_tensor_bytes(obj) / BYTES_PER_MB:.0f} MB needed, '
            f'{shutil.disk_usage(directory).free / BYTES_PER_MB:.0f} MB free); {kept}') from None


def namespace_to_dict(namespace: argparse.Namespace) -> Dict[str, Any]:
    """Convert an argparse.Namespace (nested ones included) to a plain dict."""
    return {key: namespace_to_dict(value) if isinstance(value, argparse.Namespace) else value
            for key, value in vars(namespace).items()}


_GLOBAL_IN_ERROR = re.compile(r"GLOBAL (\S+) (?:was|whose)")


def _unsafe_global(path: str, error: Exception) -> Optional[str]:
    """Name the global that made the weights-only unpickler refuse ``path``, if any."""
    match = _GLOBAL_IN_ERROR.search(str(error))
    if match:
        return match.group(1)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: a plain pickle or torch's legacy format
        names = _unsafe_pickle_globals(path)
    names = [name for name in names if name != "argparse.Namespace"]
    return ", ".join(names) if names else None


_PICKLE_STRING_OPS = ("STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
                      "SHORT_BINUNICODE", "BINUNICODE8")
_PICKLE_PUT_OPS = ("PUT", "BINPUT", "LONG_BINPUT")
_PICKLE_GET_OPS = ("GET", "BINGET", "LONG_BINGET")
_MAX_SCANNED_PICKLES = 5  # torch's legacy format: magic, protocol, sys info, object, keys


def _unsafe_pickle_globals(path: str) -> list:
    """Globals outside torch's weights-only allow-list that a plain (or legacy-format) pickle
    file names, found by reading its opcodes with pickletools, which never executes them.

    Only used to word the refusal: torch's weights-only unpickler has already refused the file
    (for protocol 4 and 5 pickles, at the FRAME opcode, before it reaches any global).
    """
    import pickletools
    names = []
    try:
        with open(path, "rb") as handle:
            for _ in range(_MAX_SCANNED_PICKLES):
                strings, memo, last_string = [], {}, None
                for opcode, arg, _ in pickletools.genops(handle):
                    if opcode.name in ("GLOBAL", "INST"):
                        names.append(tuple(arg.split(" ", 1)))
                    elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append((strings[-2], strings[-1]))
                    if opcode.name in _PICKLE_STRING_OPS:
                        strings.append(arg)
                    elif opcode.name == "MEMOIZE":
                        memo[len(memo)] = last_string
                    elif opcode.name in _PICKLE_PUT_OPS:
                        memo[arg] = last_string
                    elif opcode.name in _PICKLE_GET_OPS and memo.get(arg) is not None:
                        strings.append(memo[arg])
                    last_string = arg if opcode.name in _PICKLE_STRING_OPS else None
    except Exception:  # the end of the pickles, raw tensor data, or a damaged file
        pass
    return [f"{module}.{name}" for module, name in dict.fromkeys(names)
            if not _weights_only_allows(module, name)]


def _weights_only_allows(module: str, name: str) -> bool:
    """Whether ``torch.load(weights_only=True)`` accepts the global ``module.name``.

    Asked through public API only: a two-opcode pickle naming the global is given to torch.load,
    whose refusal names the global (``_GLOBAL_IN_ERROR``); an accepted global only gets the
    file rejected later, as a checkpoint without torch's magic number. Nothing is executed, and
    nothing outside torch's allow-list is imported.
    """
    import io
    if "\n" in module or "\n" in name:  # cannot be written as a GLOBAL opcode, so never allowed
        return False
    probe = b"\x80\x02c" + f"{module}\n{name}\n".encode("utf-8") + b"."
    try:
        torch.load(io.BytesIO(probe), weights_only=True)
    except pickle.UnpicklingError as error:
        return _GLOBAL_IN_ERROR.search(str(error)) is None
    except Exception:  # accepted, then refused for not being a checkpoint
        return True
    return True


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _safetensors_device(map_location: Any) -> str:
    if isinstance(map_location, (str, torch.device)):
        return str(map_location)
    # Callables and remapping dicts have no safetensors equivalent.
    return "cpu"


URL_SCHEMES = ("https://", "http://")


def _cached_download(url: str) -> str:
    """The local copy of ``url`` in the torch hub cache (``torch.hub.get_dir()/checkpoints``,
    named by the URL's last path component as torch.hub names it), downloaded the first time.

    The download goes to a temporary file renamed into place, so an interrupted one leaves
    nothing behind that a later run would take for the checkpoint.
    """
    from urllib.parse import urlparse
    name = os.path.basename(urlparse(url).path)
    if not name:
        raise CheckpointError(f"checkpoint URL {url} names no file")
    directory = os.path.join(torch.hub.get_dir(), "checkpoints")
    cached = os.path.join(directory, name)
    if os.path.isfile(cached):
        return cached
    print(f"downloading {url} to {cached}", flush=True)
    try:
        os.makedirs(directory, exist_ok=True)
        torch.hub.download_url_to_file(url, cached, progress=False)
    except Exception as error:  # HTTP, network and file-system errors alike
        raise CheckpointError(f"cannot download checkpoint {url}: {_first_line(error)}") from None
    return cached


def load_checkpoint(path: Union[str, os.PathLike], map_location: Any = "cpu") -> Any:
    """Load a checkpoint without executing code from the file.

    ``.pth``-style files are read with ``torch.load(weights_only=True)``; the only extra
    type allowed is argparse.Namespace (the original release stored ``args`` that way),
    and such an ``args`` entry is returned as a plain dict. ``.safetensors`` files are
    returned as ``{'model': state_dict}``.

    Args:
        path: checkpoint file, or an ``https://`` (``http://``) URL: downloaded once into the
            torch hub cache, then loaded from there as a local file.
        map_location: as for torch.load.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or needs a global
            outside the allow-list (the pickle is never executed), or the download failed.
    """
    path = os.fspath(path)
    if path.startswith(URL_SCHEMES):
        cached = _cached_download(path)
        try:
            return load_checkpoint(cached, map_location=map_location)
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from None
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return {"model": load_file(path, device=_safetensors_device(map_location))}
        except Exception as error:  # any failure means an unusable file
            raise CheckpointError(f"{path} is not a readable safetensors file "
                                  f"(truncated or corrupt?): {_first_line(error)}") from None

    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # torch warns (on stderr) about protocol-4 pickles, which it then refuses anyway.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        name = _unsafe_global(path, error)
        if name is not None:
            raise CheckpointError(f"refusing to load {path}: it needs code outside the safe "
                                  f"allow-list ({name})") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint "
                              f"(truncated or corrupt?): {_first_line(error)}") from None
    except Exception as error:  # torch raises many types for bad files
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint "
                              f"(truncated or corrupt?): {_first_line(error)}") from None

    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("args"), argparse.Namespace):
        checkpoint["args"] = namespace_to_dict(checkpoint["args"])
    return checkpoint


def resample_pos_embed(pos_embed: torch.Tensor, grid: Tuple[int, int],
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubic resampling of a square grid of position embeddings behind the prefix tokens'
    entries (class, and distillation for a distilled DeiT), as DeiT finetunes at a new
    resolution. (1, P + g * g, C) -> (1, P + gh * gw, C), P = ``num_prefix_tokens``.

    Raises:
        ValueError: the entries behind the prefix tokens do not form a square grid.
    """
    cls_pos, patch_pos = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    side = math.isqrt(patch_pos.shape[1])
    if side * side != patch_pos.shape[1]:
        raise ValueError(f'position embedding of {patch_pos.shape[1]} patches is not a square grid')
    if (side, side) == tuple(grid):
        return pos_embed
    dim = patch_pos.shape[2]
    patch_map = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch_map = F.interpolate(patch_map.float(), size=grid, mode='bicubic', align_corners=False)
    patch_pos = patch_map.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)
    return torch.cat([cls_pos, patch_pos.to(pos_embed.dtype)], dim=1)


def adapt_state_dict(state_dict: dict, model: nn.Module) -> Tuple[dict, List[str]]:
    """Maps a DeiT/timm or MTViT state dict onto ``model`` for finetuning.

    Position embeddings are resampled to the model's grid; a single-scale ``pos_embed`` gives
    both ``pos_embed_list`` entries of a multi-scale model (and ``pos_embed_list.1`` gives the
    ``pos_embed`` of a single-scale one); a classifier of another class count is dropped (the
    model's timm ``pretrained_cfg['classifier']``: ``head``, ``fc``, ``head.fc``, ..., and a
    distilled DeiT's ``head_dist``). Returns the adapted state dict and notes on what was
    changed.
    """
    target = model.state_dict()
    adapted = dict(state_dict)
    notes = []
    if 'dist_token' in adapted and 'dist_token' not in target:
        # A distilled DeiT: its class token and patches go on, the distillation token (position
        # entry 1) and head do not.
        for key in [key for key in adapted if key == 'dist_token' or key.startswith('head_dist.')]:
            del adapted[key]
        if 'pos_embed' in adapted:
            adapted['pos_embed'] = torch.cat([adapted['pos_embed'][:, :1],
                                              adapted['pos_embed'][:, 2:]], dim=1)
        notes.append('dist_token, its position embedding and head_dist: dropped (the model has '
                     'no distillation token)')
    elif 'dist_token' in target and 'dist_token' not in adapted:
        raise ValueError('the model has a distillation token, the checkpoint none: finetune '
                         'from a distilled checkpoint, or use the model without distillation')
    source_pos = adapted.pop('pos_embed', None)
    if source_pos is None:
        source_pos = adapted.get('pos_embed_list.1')
    targets = [key for key in ('pos_embed', 'pos_embed_list.0', 'pos_embed_list.1') if key in target]
    for key in targets:
        source = adapted.get(key, source_pos) if key != 'pos_embed' else source_pos
        if source is None:
            continue
        full_grid = tuple(model.patch_embed.grid_size)
        grid = (full_grid if key != 'pos_embed_list.0'
                else (full_grid[0] // POOL, full_grid[1] // POOL))
        adapted[key] = resample_pos_embed(source, grid,
                                          num_prefix_tokens=1 + ('dist_token' in target))
        if adapted[key] is not source:
            notes.append(f'{key}: resampled {tuple(source.shape)} -> {tuple(adapted[key].shape)}')
    for key in list(adapted):
        if key.startswith('pos_embed') and key not in target:
            del adapted[key]
    pretrained_cfg = getattr(model, 'pretrained_cfg', None) or {}
    classifiers = {*classifier_names(pretrained_cfg.get('classifier')), 'head_dist'}
    for key in [key for key in adapted if key.rsplit('.', 1)[0] in classifiers]:
        if key in target and adapted[key].shape != target[key].shape:
            notes.append(f'{key}: dropped, shape {tuple(adapted[key].shape)} differs from the '
                         f"model's {tuple(target[key].shape)}")
            del adapted[key]
    return adapted, notes


def num_classes_of(weights: Optional[dict], model_name: str, default: int) -> int:
    """The class count of a checkpoint's classifier (timm's name for the model's: ``head``,
    ``fc``, ``head.fc``, ...), or ``default`` without a checkpoint."""
    import timm
    cfg = timm.models.get_pretrained_cfg(model_name)
    for name in classifier_names(cfg.classifier if cfg is not None else None):
        if weights and f'{name}.weight' in weights:
            return weights[f'{name}.weight'].shape[0]
    return default


def classifier_names(classifier: Union[str, Sequence[str], None]) -> List[str]:
    """The module names of a model's classifier from timm's ``pretrained_cfg['classifier']``
    (one name such as ``fc`` or ``head.fc``, several for a distilled DeiT, or None: ``head``)."""
    if not classifier:
        return ['head']
    return [classifier] if isinstance(classifier, str) else list(classifier)


def model_state_dict(checkpoint: dict, path: str) -> dict:
    """The weights in a checkpoint: under 'model' (DeiT, MTViT), 'state_dict' (timm) or bare."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{path} holds a {type(checkpoint).__name__}, not a checkpoint '
                              f'(a dict of weights)')
    for key in ('model', 'state_dict'):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    if not checkpoint or not all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        raise CheckpointError(f'{path} holds no model weights (no "model" or "state_dict" entry)')
    return checkpoint


# How many keys a mismatch message lists before abbreviating (it stays one readable line).
MAX_KEYS_IN_MESSAGE = 8


def _listed(keys: List[str]) -> str:
    """The first ``MAX_KEYS_IN_MESSAGE`` of ``keys``, comma-separated, then the total if cut."""
    more = f' ... ({len(keys)} in all)' if len(keys) > MAX_KEYS_IN_MESSAGE else ''
    return ', '.join(keys[:MAX_KEYS_IN_MESSAGE]) + more


def _shape_mismatches(state_dict: dict, target: dict) -> List[str]:
    """``'key (checkpoint shape) vs (model shape)'`` for every key of both dicts whose tensor
    shapes differ, sorted by key."""
    return [f'{key} {tuple(state_dict[key].shape)} vs {tuple(target[key].shape)}'
            for key in sorted(set(target) & set(state_dict))
            if state_dict[key].shape != target[key].shape]


def load_weights(model: torch.nn.Module, state_dict: dict, path: str,
                 chosen_by: Optional[str] = None, saved_model: Optional[str] = None):
    """Loads a checkpoint of this very model (resume, eval), listing any mismatch; ``chosen_by``
    names the option that chose the model (``--model NAME``; default: its class), and
    ``saved_model`` the model the checkpoint's run named, given when that is another."""
    target = model.state_dict()
    missing = sorted(set(target) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(target))
    wrong_shape = _shape_mismatches(state_dict, target)
    if missing or unexpected or wrong_shape:
        problems = '; '.join(f'{name}: {_listed(keys)}'
                             for name, keys in (('missing', missing), ('unexpected', unexpected),
                                                ('shape', wrong_shape)) if keys)
        saved = f'; it was saved by --model {saved_model}' if saved_model else ''
        raise CheckpointError(f'{path} does not fit {chosen_by or type(model).__name__} '
                              f'({problems}){saved}')
    model.load_state_dict(state_dict, strict=True)


def finetune_from(model: torch.nn.Module, path: str, state_dict: Optional[dict] = None):
    """Initialises ``model`` from a DeiT/timm or MTViT checkpoint (at ``path``, or its weights
    ``state_dict`` if already read): resamples position embeddings, drops a head of another class
    count and a distillation token the model lacks; refuses when backbone weights are missing."""
    if state_dict is None:
        state_dict = model_state_dict(load_checkpoint(path), path)
    try:
        state_dict, notes = adapt_state_dict(state_dict, model)
    except ValueError as error:
        raise CheckpointError(f'{path} does not fit the model: {error}') from None
    wrong_shape = _shape_mismatches(state_dict, model.state_dict())
    if wrong_shape:
        raise CheckpointError(f'{path} does not fit the model: shapes differ for {_listed(wrong_shape)}')
    result = model.load_state_dict(state_dict, strict=False)
    for note in notes:
        print(f'finetune: {note}')
    print(f'finetune from {path}: missing keys {result.missing_keys}, '
          f'unexpected keys {result.unexpected_keys}')
    missing_backbone = [key for key in result.missing_keys if key.startswith(BACKBONE_PREFIXES)]
    if missing_backbone:
        raise CheckpointError(f'{path} lacks backbone weights {_listed(missing_backbone)}: '
                              f'refusing to finetune from it')
