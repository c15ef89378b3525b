"""Loading and saving WinTok weights, safely.

Formats:
- official: `torch.save({'args': {...}, 'trainer': {'unitok': state_dict}, ...})` from the
  WeChatCV/WinTok trainer, keys in the transformers-4 SigLIP layout
  (`encoder.vision_model.encoder.layers.3.mlp.fc1.weight`). Read with weights_only=True.
- ours: a directory with `config.json` + `model.safetensors`.
- a preset name: random weights (warned).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import (
    PRESETS,
    ConfigError,
    WinTokConfig,
    config_from_official_args,
    get_preset,
    read_siglip_vision_config,
)
from .wintok import WinTok

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded; the message says why and what to do."""


# official key -> ours. Applied in order; the first matching rule wins.
_KEY_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(encoder|decoder)\.vision_model\.encoder\.layers\."), r"\1.layers."),
    (re.compile(r"^(encoder|decoder)\.vision_model\."), r"\1."),
    (re.compile(r"^decode_task_layer_2\.0\."), "decode_task_layer_2.conv."),
]
_PREFIXES = ("module.", "_orig_mod.")
_DERIVED = re.compile(r"(^|\.)position_ids$")  # buffers recomputed at init, safe to drop


def remap_official_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official (transformers-4 SigLIP layout) state dict -> our module names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        for p in _PREFIXES:
            while key.startswith(p):
                key = key[len(p):]
        if _DERIVED.search(key):
            continue
        for pattern, repl in _KEY_RULES:
            new = pattern.sub(repl, key, count=1)
            if new != key:
                key = new
                break
        if key in out:
            raise CheckpointError(f"two checkpoint keys map to {key!r}")
        out[key] = value
    return out


def load_state_strict(model: WinTok, sd: dict[str, torch.Tensor], source: str) -> None:
    """Copy every tensor; any missing, unexpected or mis-shaped key is one error listing them all."""
    own = model.state_dict()
    _check_keys({k: v.shape for k, v in own.items()}, {k: v.shape for k, v in sd.items()}, source)
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(sd[k].to(t.dtype))


def _check_keys(own: dict[str, torch.Size], sd: dict[str, torch.Size], source: str) -> None:
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad_shape = sorted(
        f"{k}: checkpoint {tuple(sd[k])} vs model {tuple(own[k])}"
        for k in set(own) & set(sd) if tuple(own[k]) != tuple(sd[k])
    )
    if missing or unexpected or bad_shape:
        parts = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
                parts.append(f"{title}: {shown}")
        raise CheckpointError(
            f"{source} does not match the WinTok config ({'; '.join(parts)}). "
            "If this is an official checkpoint, pass the SigLIP config it was trained from as encoder_config."
        )


def _torch_load(path: str, allow_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, ValueError):
        pass  # not a zip checkpoint (mmap unsupported): retry without mmap
    except pickle.UnpicklingError as e:
        return _refuse_or_unpickle(path, allow_pickle, e)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        return _refuse_or_unpickle(path, allow_pickle, e)
    except Exception as e:  # truncated or not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}".split("\n")[0]) from None


# Opcodes by which a pickle imports or calls code (pickletools names); a file whose pickle
# parses to its STOP and holds one of them is valid content that weights_only refused.
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD",
                 "EXT1", "EXT2", "EXT4"}
# what every torch.save pickle names (tensor rebuilding; protocol 0/1 object plumbing)
_TORCH_OWN = ("torch.", "collections.OrderedDict", "copy_reg._reconstructor", "copyreg._reconstructor",
              "__builtin__.object", "builtins.object")
_LEGACY_PICKLES = 5  # torch's legacy format: magic number, protocol, sys info, the object, storage keys


def _pickle_scan(path: str) -> tuple[bool, list[str]]:
    """(the file's pickle parses to its end, the globals it names), found by pickletools, which
    only parses opcodes and never imports or runs anything. Torch's zip format holds the pickle
    as `*/data.pkl` (a cut zip loses its directory and fails here); the legacy format is a
    sequence of pickles, then the raw tensor bytes, which are not checked here (a file cut
    there is found when it is loaded with allow_pickle)."""
    names: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                pkl = next(n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
                streams, count = io.BytesIO(z.read(pkl)), 1
        else:
            streams, count = open(path, "rb"), _LEGACY_PICKLES  # noqa: SIM115 - closed below
        with streams as f:
            for _ in range(count):
                strings: list[str] = []
                last = None
                for op, arg, _pos in pickletools.genops(f):  # ValueError on a bad or cut stream
                    last = op.name
                    if isinstance(arg, str):
                        strings.append(arg)
                    if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                        names.append(arg.replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(f"{strings[-2]}.{strings[-1]}")
                    elif op.name in _CODE_OPCODES and not names:
                        names.append(op.name)
                if last != "STOP":
                    return False, names
    except (ValueError, StopIteration, OSError, EOFError, zipfile.BadZipFile, KeyError):
        return False, names
    return True, names


def _unpickler_reason(msg: str) -> str:
    """The specific reason in torch's long weights-only error ('Unsupported global: GLOBAL exec ...')."""
    tail = msg.split("WeightsUnpickler error:", 1)[-1]
    line = next((ln.strip() for ln in tail.splitlines() if ln.strip()), "")
    return line.split(". ", 1)[0].rstrip(".") or msg.strip().splitlines()[0]


def _refuse_or_unpickle(path: str, allow_pickle: bool, err: Exception) -> Any:
    """torch's weights-only loader refused the file: blocked pickled code (a valid pickle that
    imports or calls something), or a corrupt file? The pickle's own opcodes tell, not the wording
    of torch's message (a protocol-4 pickle's class import reads 'Unsupported operand 149')."""
    msg = str(err)
    reason = _unpickler_reason(msg) if msg.strip() else type(err).__name__
    intact, names = _pickle_scan(path)
    if "weights only" not in msg.lower() or not intact:
        raise CheckpointError(f"cannot read checkpoint {path}: not a torch checkpoint or corrupt ({reason})")
    foreign = [n for n in dict.fromkeys(names) if not n.startswith(_TORCH_OWN)]
    if foreign and foreign[0] not in reason:  # torch's wording did not name what the file imports
        reason = f"it imports {', '.join(foreign[:5])}; torch: {reason}"
    if not allow_pickle:
        raise CheckpointError(
            f"refusing to load {path}: it needs pickled code to load ({reason}). Weights files should hold "
            "tensors only. If you trust its source, convert it once with allow_pickle=True "
            "(CLI: --allow-pickle) and use the converted directory."
        ) from None
    warnings.warn(f"loading {path} with pickle enabled: this can run arbitrary code", stacklevel=3)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}".split("\n")[0]) from None


def read_official(
    path: str, encoder_config: str | None = None, allow_pickle: bool = False
) -> tuple[WinTokConfig, dict[str, torch.Tensor]]:
    """Config and remapped state dict of an official .pth checkpoint."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    ckpt = _torch_load(path, allow_pickle)
    if isinstance(ckpt, dict) and "trainer" in ckpt and isinstance(ckpt["trainer"], dict):
        sd = ckpt["trainer"].get("unitok")
        args = ckpt.get("args") or {}
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        sd, args = ckpt, {}
    else:
        sd, args = None, {}
    if not isinstance(sd, dict):
        raise CheckpointError(
            f"{path} is not an official WinTok checkpoint: expected {{'args': ..., 'trainer': {{'unitok': state_dict}}}}"
        )
    if not isinstance(args, dict):
        args = dict(getattr(args, "__dict__", {}))
    encoder = read_siglip_vision_config(encoder_config) if encoder_config else None
    sd = remap_official_keys(sd)
    try:
        config = config_from_official_args(args, encoder)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if encoder is None:
        config = _fill_from_shapes(config, sd)
    return config, sd


def _fill_from_shapes(config: WinTokConfig, sd: dict[str, torch.Tensor]) -> WinTokConfig:
    """Without an encoder config, read every size the weights fix; heads and eps stay the preset's."""
    kw: dict[str, Any] = {}
    pe = sd.get("encoder.embeddings.patch_embedding.weight")
    pos = sd.get("encoder.embeddings.position_embedding.weight")
    fc1 = sd.get("encoder.layers.0.mlp.fc1.weight")
    if pe is not None:
        kw.update(hidden_size=pe.shape[0], num_channels=pe.shape[1], patch_size=pe.shape[2])
    if pos is not None and pe is not None:
        kw["image_size"] = int(round(pos.shape[0] ** 0.5)) * pe.shape[2]
    if fc1 is not None:
        kw["intermediate_size"] = fc1.shape[0]
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    if layers:
        kw["num_hidden_layers"] = max(layers) + 1
    if kw.get("hidden_size", config.hidden_size) % config.num_attention_heads:
        raise CheckpointError(
            "the checkpoint's encoder width does not fit the so400m preset's heads; pass encoder_config "
            "(the SigLIP config.json it was trained from)"
        )
    changed = {k: v for k, v in kw.items() if getattr(config, k) != v}
    if changed:
        warnings.warn(
            f"no encoder_config given: took encoder sizes {changed} from the weights; heads "
            f"({config.num_attention_heads}) and eps ({config.layer_norm_eps}) come from the so400m preset",
            stacklevel=3,
        )
    return config.replace(**kw)


def save_pretrained(model: WinTok, directory: str) -> None:
    """Write `config.json` + `model.safetensors` (contiguous fp32 or as-is tensors)."""
    os.makedirs(directory, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = os.path.join(directory, WEIGHTS_NAME + ".tmp")
    save_file(sd, tmp, metadata={"format": "pt", "wintok_format_version": str(FORMAT_VERSION)})
    os.replace(tmp, os.path.join(directory, WEIGHTS_NAME))
    cfg = {"architecture": "WinTok", "format_version": FORMAT_VERSION, **model.config.to_dict()}
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def load_pretrained(directory: str) -> WinTok:
    cfg_path = os.path.join(directory, CONFIG_NAME)
    w_path = os.path.join(directory, WEIGHTS_NAME)
    if not (os.path.isfile(cfg_path) and os.path.isfile(w_path)):
        raise CheckpointError(f"{directory} is not a WinTok model directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            config = WinTokConfig.from_dict(json.load(f))
    except (json.JSONDecodeError, ConfigError, TypeError) as e:
        raise CheckpointError(f"bad {cfg_path}: {e}") from None
    try:
        sd = load_file(w_path)
    except Exception as e:
        raise CheckpointError(f"cannot read {w_path}: {e}") from None
    model = WinTok(config, init_weights=False)
    load_state_strict(model, sd, w_path)
    return model.eval()


# Trained models that ship inside the package, by name: wintok_model/weights/<name>/ in our
# directory format. A shipped name wins over a preset of the same name (the preset is its shape,
# for training it from scratch).
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


def shipped_models() -> list[str]:
    if not os.path.isdir(WEIGHTS_DIR):
        return []
    return sorted(n for n in os.listdir(WEIGHTS_DIR) if os.path.isfile(os.path.join(WEIGHTS_DIR, n, WEIGHTS_NAME)))


def resolve_spec(spec: str) -> str:
    """A shipped model's name -> its packaged directory; anything else unchanged."""
    if spec and not os.path.exists(spec) and spec in shipped_models():
        return os.path.join(WEIGHTS_DIR, spec)
    return spec


def is_random_preset(spec: str | None) -> bool:
    """True when `spec` loads a preset with random weights (not a shipped model, not a path)."""
    return bool(spec) and spec in PRESETS and resolve_spec(spec) == spec and not os.path.exists(spec)


def load_model(spec: str, encoder_config: str | None = None, allow_pickle: bool = False) -> WinTok:
    """A shipped model's name, a preset name, one of our directories, or an official .pth file ->
    WinTok in eval mode."""
    spec = resolve_spec(spec)
    if spec in PRESETS and not os.path.exists(spec):
        warnings.warn(f"preset {spec!r} has RANDOM weights: its tokens mean nothing", stacklevel=2)
        return WinTok(get_preset(spec)).eval()
    if os.path.isdir(spec):
        return load_pretrained(spec)
    if os.path.isfile(spec):
        if spec.endswith(".safetensors"):
            return load_pretrained(os.path.dirname(spec) or ".")
        config, sd = read_official(spec, encoder_config, allow_pickle)
        model = WinTok(config, init_weights=False)
        load_state_strict(model, sd, spec)
        return model.eval()
    raise CheckpointError(
        f"model {spec!r} not found: give a preset ({', '.join(PRESETS)}), a model directory or an official .pth"
    )


def convert_checkpoint(src: str, out_dir: str, encoder_config: str | None = None, allow_pickle: bool = False) -> WinTok:
    """Official .pth -> our directory format; returns the loaded model."""
    model = load_model(src, encoder_config=encoder_config, allow_pickle=allow_pickle)
    save_pretrained(model, out_dir)
    return model


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(spec: str) -> str:
    """sha256 of the weights file behind a model spec ('preset:<name>' for presets)."""
    spec = resolve_spec(spec)
    if spec in PRESETS and not os.path.exists(spec):
        return f"preset:{spec}"
    path = os.path.join(spec, WEIGHTS_NAME) if os.path.isdir(spec) else spec
    return file_sha256(path)


def check_model(spec: str, encoder_config: str | None = None, allow_pickle: bool = False) -> WinTokConfig:
    """Validate a model spec without building weights: config readable, keys and shapes match."""
    spec = resolve_spec(spec)
    if spec in PRESETS and not os.path.exists(spec):
        return get_preset(spec)
    if os.path.isdir(spec) or spec.endswith(".safetensors"):
        directory = spec if os.path.isdir(spec) else (os.path.dirname(spec) or ".")
        cfg_path, w_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
        if not (os.path.isfile(cfg_path) and os.path.isfile(w_path)):
            raise CheckpointError(f"{directory} is not a WinTok model directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                config = WinTokConfig.from_dict(json.load(f))
            from safetensors import safe_open

            with safe_open(w_path, "pt") as f:
                shapes = {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read model directory {directory}: {e}") from None
        sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        source = w_path
    elif os.path.isfile(spec):
        config, sd = read_official(spec, encoder_config, allow_pickle)
        source = spec
    else:
        raise CheckpointError(
            f"model {spec!r} not found: give a preset ({', '.join(PRESETS)}), a model directory or an official .pth"
        )
    with torch.device("meta"):
        model = WinTok(config, init_weights=False)
    own = {k: v.shape for k, v in model.state_dict().items()}
    _check_keys(own, {k: v.shape for k, v in sd.items()}, source)
    return config
