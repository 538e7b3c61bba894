"""Evaluation and calibration text through ``datasets``: offline package files or hub names.

A data config names a ``datasets`` builder (``csv``, ``text``, or a hub data set such as
``glue``), its files (``pkg:`` paths resolve to files inside installed packages) or a folder of
class folders (``label_folders``: one document per file, label = folder name), which
columns hold text and label, rows to drop, and the seed of the deterministic split.
"""

from __future__ import annotations

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


def load_dataset(dcfg: DictConfig):
    import datasets

    if dcfg.get("label_folders"):
        ds = _label_folders(dcfg)
    else:
        files = dcfg.get("data_files")
        if files is not None:
            files = [assets.resolve(f, "data.data_files") for f in (files if OmegaConf.is_list(files) else [files])]
        ds = datasets.load_dataset(dcfg.builder, dcfg.get("subset"), data_files=files, split=dcfg.get("split", "train"),
                                   **_builder_kwargs(dcfg))
    for column, values in (dcfg.get("exclude") or {}).items():
        drop = set(values)
        ds = ds.filter(lambda row: row[column] not in drop)
    text = dcfg.get("text_column", "text")
    return ds.filter(lambda row: bool(row[text] and str(row[text]).strip()))


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


def load_text(dcfg: DictConfig) -> str:
    """All documents of a text data set joined by blank lines (for perplexity / calibration)."""
    ds = load_dataset(dcfg)
    start, limit = int(dcfg.get("start_document") or 0), dcfg.get("max_documents")
    texts = ds[dcfg.get("text_column", "text")][start:]
    return "\n\n".join(str(t) for t in (texts[:limit] if limit else texts))
