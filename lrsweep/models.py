"""Loading models: offline package assets (``pkg:``), local folders, GGUF files, hub ids, and
random-weight models of any size (``model.random_init``: a transformers config, seeded).

Model classes come from ``MODEL_CLASSES`` keyed on ``model.kind``; nothing here branches on
model names. ``trust_remote_code`` is passed only as the config says (default false), and
weights load through transformers' safetensors path (or GGUF, dequantized and cached once).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrsweep import assets
from lrsweep.errors import ConfigError

KINDS = ("encoder", "causal_lm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _auto_class(kind: str):
    import transformers

    classes = {"encoder": transformers.AutoModel, "causal_lm": transformers.AutoModelForCausalLM}
    if kind not in classes:
        raise ConfigError("model.kind", f"{kind!r} is unknown", KINDS)
    return classes[kind]


def model_dtype(mcfg: DictConfig) -> torch.dtype:
    if mcfg.dtype not in DTYPES:
        raise ConfigError("model.dtype", f"{mcfg.dtype!r} is unknown", DTYPES)
    return DTYPES[mcfg.dtype]


def resolve_path(mcfg: DictConfig) -> str:
    """The local folder (or hub id) the model loads from."""
    path = assets.resolve(str(mcfg.path), "model.path")
    looks_local = path.startswith(("/", "./", "../", "~")) or Path(path).exists()
    if looks_local and not Path(path).expanduser().exists():
        raise ConfigError("model.path", f"{path} does not exist")
    if mcfg.get("gguf_file") and not (Path(path) / mcfg.gguf_file).is_file():
        raise ConfigError("model.gguf_file", f"{mcfg.gguf_file!r} is not a file in {path}")
    return str(Path(path).expanduser()) if looks_local else path


def _load_kwargs(mcfg: DictConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {"trust_remote_code": bool(mcfg.get("trust_remote_code", False))}
    if mcfg.get("revision"):
        kw["revision"] = mcfg.revision
    return kw


def random_config(mcfg: DictConfig):
    """The transformers config of a random-weight model (``model.random_init``: model_type + sizes)."""
    from transformers import AutoConfig

    spec = OmegaConf.to_container(mcfg.random_init, resolve=True)
    model_type = spec.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **spec)
    except (ValueError, TypeError) as e:
        raise ConfigError("model.random_init.model_type", f"{model_type!r}: {e}") from None


def skeleton(mcfg: DictConfig) -> nn.Module:
    """The model's module tree with weights on the meta device (cheap; used to validate configs).

    Built under ``torch.device("meta")`` rather than accelerate's ``init_empty_weights``, which
    re-registers every parameter and so unties tied weights (lm_head / embed_tokens)."""
    from transformers import AutoConfig

    kw = _load_kwargs(mcfg)
    if mcfg.get("random_init"):
        config = random_config(mcfg)
    else:
        path = resolve_path(mcfg)
        if mcfg.get("gguf_file"):
            kw["gguf_file"] = mcfg.gguf_file
        try:
            config = AutoConfig.from_pretrained(path, **kw)
        except (OSError, ValueError) as e:
            raise ConfigError("model.path", f"{path!r} is not a loadable model: {str(e).splitlines()[0]}") from None
    with torch.device("meta"):
        return _auto_class(mcfg.kind).from_config(config, trust_remote_code=kw["trust_remote_code"])


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _gguf_as_folder(mcfg: DictConfig, path: str, cache_dir: Path) -> str:
    """Dequantize a GGUF checkpoint once into a safetensors folder keyed by the file's hash (a cache
    folder: verified against its files' sha256 on every load, rebuilt when damaged)."""
    from transformers import AutoTokenizer

    from lrsweep import cache

    gguf = Path(path) / mcfg.gguf_file

    def build(tmp: Path) -> None:
        kw = {**_load_kwargs(mcfg), "gguf_file": mcfg.gguf_file}
        model = _auto_class(mcfg.kind).from_pretrained(path, dtype=torch.float32, **kw)
        model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(path, **kw).save_pretrained(tmp)

    return str(cache.folder(cache_dir, "models", f"{gguf.stem}-{_file_digest(gguf)}", build))


def _load_random(mcfg: DictConfig, device: str) -> tuple[nn.Module, Any]:
    """A seeded random-weight model of ``model.random_init`` sizes (built on CPU) and ``model.tokenizer``."""
    from transformers import AutoTokenizer

    torch.manual_seed(int(mcfg.get("seed", 0)))
    model = _auto_class(mcfg.kind).from_config(random_config(mcfg), dtype=model_dtype(mcfg))
    tok_path = assets.resolve(str(mcfg.tokenizer), "model.tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tok_path, **_load_kwargs(mcfg))
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError("model.tokenizer", f"{len(tokenizer)} tokens exceed the model's vocab_size "
                          f"{model.config.vocab_size}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def load(mcfg: DictConfig, device: str, cache_dir: str | Path) -> tuple[nn.Module, Any]:
    """(model in eval mode on ``device``, tokenizer)."""
    from transformers import AutoTokenizer

    if mcfg.get("random_init"):
        return _load_random(mcfg, device)
    path = resolve_path(mcfg)
    if mcfg.get("gguf_file"):
        path = _gguf_as_folder(mcfg, path, Path(cache_dir))
    kw = _load_kwargs(mcfg)
    model = _auto_class(mcfg.kind).from_pretrained(path, dtype=model_dtype(mcfg), use_safetensors=True, **kw)
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


TARGET_TYPES = (nn.Linear, nn.Embedding)  # what ``model.targets`` can select


def target_modules(model: nn.Module, pattern: str) -> dict[str, nn.Linear | nn.Embedding]:
    """The Linear and Embedding modules whose qualified name fully matches ``pattern``, in model order."""
    regex = re.compile(pattern)
    return {name: m for name, m in model.named_modules() if isinstance(m, TARGET_TYPES) and regex.fullmatch(name)}


def blocks(layers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Layers grouped by block: the name up to its first numeric component (``model.layers.3``); a
    layer without one (an embedding, ``lm_head``) is its own block."""
    out: dict[str, dict[str, Any]] = {}
    for name, lin in layers.items():
        m = re.match(r"(.*?\.\d+)\.", name)
        out.setdefault(m.group(1) if m else name, {})[name] = lin
    return out


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def config_stamp(mcfg: DictConfig) -> list | None:
    """What a model's module tree depends on besides its config keys: the local config file's (or
    GGUF file's) size and mtime, and the transformers version; None for hub ids and random-init
    models built from the config alone (``random_init`` is in the config: stamp without a file)."""
    from importlib.metadata import version

    if mcfg.get("random_init"):
        return [version("transformers")]
    try:
        path = Path(resolve_path(mcfg))
    except ConfigError:
        return None
    f = path / mcfg.gguf_file if mcfg.get("gguf_file") else path / "config.json"
    if not f.is_file():
        return None
    st = f.stat()
    return [str(f), st.st_size, st.st_mtime_ns, version("transformers")]


def layer_type(name: str) -> str:
    """A layer's name with its block index removed: ``model.layers.3.mlp.up_proj`` -> ``model.layers.*.mlp.up_proj``."""
    return re.sub(r"\.\d+\.", ".*.", name, count=1)
