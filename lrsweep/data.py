"""Evaluation and calibration text through ``datasets``: offline package files or hub names.

A data config names a ``datasets`` builder (``csv``, ``text``, or a hub data set such as
``glue``), its files (``pkg:`` paths resolve to files inside installed packages) or a folder of
class folders (``label_folders``: one document per file, label = folder name), which
columns hold text and label, rows to drop, and the seed of the deterministic split.
A text for perplexity or calibration (``load_text``) is its documents joined by ``join``
(default a blank line, ``"\n\n"``, as GPTQ / SVD-LLM join WikiText-2); ``keep_empty: true``
keeps empty rows in that join (WikiText-2's blank lines), which are dropped otherwise.

A config without ``data_files`` or ``label_folders`` names a data set on the Hugging Face hub
(e.g. ``builder: Salesforce/wikitext``, ``subset: wikitext-2-raw-v1``): it needs network unless
``datasets`` has it cached; offline it fails with one line naming the config key (``check_available``
before launch, ``HubDataUnavailable`` in the job), never with a silent fallback.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lrsweep import assets
from lrsweep.errors import ConfigError


@dataclass
class TextSplit:
    texts: list[str]
    labels: list[int]


@dataclass
class TextData:
    train: TextSplit
    test: TextSplit
    label_names: list[str]


def _builder_kwargs(dcfg: DictConfig) -> dict:
    """Extra keyword arguments of the ``datasets`` builder (e.g. ``encoding`` of the text builder)."""
    return OmegaConf.to_container(dcfg.builder_kwargs, resolve=True) if dcfg.get("builder_kwargs") else {}


def _label_folders(dcfg: DictConfig):
    """One document per file, labelled by its folder: ``label_folders: <dir>`` with a sub-folder per class."""
    import datasets

    root = Path(assets.resolve(str(dcfg.label_folders), "data.label_folders"))
    parts = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        ds = datasets.load_dataset(dcfg.builder, data_files=str(folder / dcfg.get("file_glob", "*.txt")),
                                   sample_by="document", split="train", **_builder_kwargs(dcfg))
        parts.append(ds.add_column(dcfg.label_column, [folder.name] * len(ds)))
    if not parts:
        raise ConfigError("data.label_folders", f"{root} has no class folders")
    return datasets.concatenate_datasets(parts)


class HubDataUnavailable(RuntimeError):
    """A hub data set that could not be loaded (no network, or not cached in offline mode)."""


OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def offline() -> str | None:
    """The environment variable that puts ``datasets`` in offline mode, if one is set."""
    return next((v for v in OFFLINE_VARIABLES if os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")), None)


def from_hub(dcfg: DictConfig) -> bool:
    """True when the data set comes from the Hugging Face hub (no local files named)."""
    return not dcfg.get("data_files") and not dcfg.get("label_folders")


def describe(dcfg: DictConfig) -> str:
    """``name (builder subset, split)``: how messages name a data set."""
    parts = " ".join(str(p) for p in (dcfg.builder, dcfg.get("subset")) if p)
    return f"{dcfg.get('name', dcfg.builder)} ({parts}, split {dcfg.get('split', 'train')})"


def _load_hub(dcfg: DictConfig, key: str):
    import datasets

    try:
        return datasets.load_dataset(dcfg.builder, dcfg.get("subset"), split=dcfg.get("split", "train"),
                                     **_builder_kwargs(dcfg))
    except Exception as e:  # ConnectionError, DatasetNotFoundError, ...: one line that says what is missing
        reason = str(e).splitlines()[0] if str(e) else ""
        mode = f"; {offline()} is set and it is not in the datasets cache" if offline() else ""
        raise HubDataUnavailable(f"{key}: {describe(dcfg)} could not be loaded from the Hugging Face hub, which "
                                 f"needs network{mode} ({type(e).__name__}: {reason})") from e


def load_dataset(dcfg: DictConfig, key: str = "data"):
    """The rows of the data set ``dcfg`` (``key``: the config key that names it, for messages)."""
    import datasets

    if dcfg.get("label_folders"):
        ds = _label_folders(dcfg)
    elif from_hub(dcfg):
        ds = _load_hub(dcfg, key)
    else:
        files = dcfg.get("data_files")
        files = [assets.resolve(f, f"{key}.data_files") for f in (files if OmegaConf.is_list(files) else [files])]
        ds = datasets.load_dataset(dcfg.builder, dcfg.get("subset"), data_files=files, split=dcfg.get("split", "train"),
                                   **_builder_kwargs(dcfg))
    for column, values in (dcfg.get("exclude") or {}).items():
        drop = set(values)
        ds = ds.filter(lambda row, column=column, drop=drop: row[column] not in drop)
    if dcfg.get("keep_empty", False):
        return ds
    text = dcfg.get("text_column", "text")
    return ds.filter(lambda row: bool(row[text] and str(row[text]).strip()))


@functools.lru_cache(maxsize=8)
def _hub_error(dcfg_json: str, key: str) -> str | None:
    try:
        _load_hub(OmegaConf.create(json.loads(dcfg_json)), key)
    except HubDataUnavailable as e:
        return str(e)
    return None


def check_available(dcfg: DictConfig, key: str) -> None:
    """ConfigError (before launch) for a hub data set that offline mode cannot load.

    Online nothing is checked here (a download can take long): a failure then becomes the grid
    point's failed row with the same message.
    """
    if not from_hub(dcfg) or not offline():
        return
    error = _hub_error(json.dumps(OmegaConf.to_container(dcfg, resolve=True), sort_keys=True), key)
    if error:
        raise ConfigError(key, error.removeprefix(f"{key}: "))


def load_classification(dcfg: DictConfig, n_train: int, n_test: int) -> TextData:
    """A deterministic train/test split (seeded shuffle) of a labelled text data set."""
    ds = load_dataset(dcfg)
    text_col, label_col = dcfg.get("text_column", "text"), dcfg.label_column
    names = sorted({str(v) for v in ds[label_col]})
    index = {n: i for i, n in enumerate(names)}
    ds = ds.shuffle(seed=int(dcfg.get("split_seed", 0)))
    n_train, n_test = min(n_train, len(ds) // 2), min(n_test, len(ds) // 2)

    def part(rows) -> TextSplit:
        return TextSplit([str(t) for t in rows[text_col]], [index[str(v)] for v in rows[label_col]])

    return TextData(part(ds[:n_train]), part(ds[len(ds) - n_test:]), names)


def bos_id(tokenizer: object, key: str) -> int:
    """The tokenizer's BOS token id (a ValueError naming ``key`` when it has none)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError(f"{key}=true but the tokenizer has no BOS token")
    return int(bos)


def load_text(dcfg: DictConfig, key: str = "text") -> str:
    """All documents of a text data set joined by ``join`` (default a blank line; for perplexity / calibration)."""
    ds = load_dataset(dcfg, key)
    start, limit = int(dcfg.get("start_document") or 0), dcfg.get("max_documents")
    texts = ds[dcfg.get("text_column", "text")][start:]
    texts = ["" if t is None else str(t) for t in (texts[:limit] if limit else texts)]  # kept empty rows: ""
    return str(dcfg.get("join", "\n\n")).join(texts)
