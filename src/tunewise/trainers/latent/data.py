"""Data for the `latent` trainer: a table of material descriptors and properties.

`prepare` turns the configured source into `table.parquet` + `meta.json` once (cached by a
fingerprint of the data config); `load_splits` turns that table into standardised tensors
split train/val/test, every run.

Embedded default: the Materials Project transport table that ships inside matminer
(Ricci et al. 2017, 47,737 compounds), featurised with Magpie element statistics. A user's
own CSV/parquet with descriptor and target columns is read as it is; one with a formula column
and no descriptor columns gets the same Magpie descriptors as the embedded table.

`prepare` checks the table before writing anything (issue 15): target leakage, infinite, empty
and constant targets, too few rows for the split and files that are not a table are refused
(ValueError naming the file and column); dropped rows, warnings and notes come back as the
`data_checks` of meta.json and ready.json, which the diagnostic report's Data section shows.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tunewise.paths import path_kind
from tunewise.runs import write_json

if TYPE_CHECKING:  # torch is imported where tensors are made: `prepare` never needs it
    import torch

log = logging.getLogger(__name__)

DEFAULT_DATA = {
    "source": "embedded",
    "path": None,
    "id_column": "mp_id",
    "formula_column": "pretty_formula",
    "descriptor_columns": None,
    "targets": ["PF_p", "S_p", "sigma_p", "kappa_p"],
    "log_targets": ["sigma_p", "kappa_p", "PF_p", "sigma_n", "kappa_n", "PF_n", "m_p", "m_n"],
    "limit": None,
    "split": {"val": 0.1, "test": 0.1, "seed": 0},
    "noise": 0.0,
}

SPLITS = ("train", "val", "test")
TABLE = "table.parquet"
META = "meta.json"
# bump when the table layout or the featurisation changes, so old caches are rebuilt
TABLE_FORMAT = 2  # 2: meta.json carries data_checks and target_stats
# keys that do not change table.parquet: noise is used by training, split and log_targets by
# load_splits, prepared_dir is where the table lives. Changing them must not redo featurisation.
NOT_IN_TABLE = ("noise", "split", "log_targets", "prepared_dir")
# a fixed seed for the `limit` subset, independent of split.seed: the table must not depend on it
LIMIT_SEED = 0
EMBEDDED_ARCHIVE = ("utils", "data_files", "mp_transport", "transport_database.tar.xz")
EMBEDDED_MEMBER = "transport_database.csv"
# data.descriptor_columns: magpie computes the Magpie descriptors from the formula column even when the table
# has numeric columns (which would otherwise be taken as the descriptors)
MAGPIE = "magpie"
# the formula column of a user table when data.formula_column (default pretty_formula) is not in it
FORMULA_FALLBACK = "formula"
# fewest rows per split: below them a validation or test R^2 decides nothing (refused at prepare)
MIN_SPLIT_ROWS = {"train": 10, "val": 5, "test": 5}
# |Pearson r| from which a descriptor counts as a copy of a target (target leakage: refused)
LEAK_R = 0.999
N_EXAMPLES = 5  # examples of dropped rows kept in data_checks


def resolve_data_config(data_cfg: dict) -> dict:
    """The data config with defaults filled in (`split` merged key by key)."""
    cfg = copy.deepcopy(DEFAULT_DATA)
    for key, value in (data_cfg or {}).items():
        if key == "split" and isinstance(value, dict):
            cfg["split"].update(value)
        else:
            cfg[key] = copy.deepcopy(value)
    return cfg


def fingerprint(data_cfg: dict) -> str:
    """Hash of everything that shapes table.parquet: the config minus NOT_IN_TABLE, plus the
    source itself (matminer's version for the embedded table, size and mtime of a user file)."""
    cfg = resolve_data_config(data_cfg)
    key: dict[str, Any] = {k: v for k, v in cfg.items() if k not in NOT_IN_TABLE}
    key["table_format"] = TABLE_FORMAT
    if cfg["source"] == "embedded":
        import matminer

        key["matminer"] = getattr(matminer, "__version__", "unknown")
    elif cfg.get("path"):
        path = Path(cfg["path"])
        if path.exists():
            stat = path.stat()
            key["file"] = [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- embedded table -------------------------------------------------------------------------


def embedded_archive() -> Path:
    import matminer

    return Path(matminer.__file__).parent.joinpath(*EMBEDDED_ARCHIVE)


def read_embedded_table() -> pd.DataFrame:
    """The transport table straight from matminer's archive (its loader would unpack into
    site-packages, which may be read-only)."""
    archive = embedded_archive()
    if not archive.exists():
        raise FileNotFoundError(f"data.source: embedded table not found at {archive} (is matminer installed?)")
    with tarfile.open(archive, "r:xz") as tar:
        member = tar.extractfile(EMBEDDED_MEMBER)
        if member is None:
            raise ValueError(f"data.source: {archive} has no {EMBEDDED_MEMBER}")
        return pd.read_csv(member)


# --- featurisation --------------------------------------------------------------------------

_featurizer = None  # one per worker process: building the Magpie preset reads its tables


def _magpie():
    global _featurizer
    if _featurizer is None:
        from matminer.featurizers.composition import ElementProperty

        _featurizer = ElementProperty.from_preset("magpie", impute_nan=True)
    return _featurizer


def magpie_labels() -> list[str]:
    return list(_magpie().feature_labels())


def _compositions(formulas: Sequence[str]) -> list[list[tuple[Any, float]] | None]:
    """(element, amount) pairs of each formula, None where pymatgen cannot parse it."""
    from pymatgen.core import Composition

    out: list[list[tuple[Any, float]] | None] = []
    for formula in formulas:
        try:
            out.append([(e, float(a)) for e, a in Composition(str(formula)).element_composition.items()])
        except Exception:  # any parse failure drops this compound only; the caller counts the drops
            out.append(None)
    return out


def featurize(formulas: Sequence[str], threads: int = 1, progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Magpie descriptors of each formula: (features [n, 132] float64 with NaN rows where it failed, ok mask
    [n] bool). The same numbers as matminer's ElementProperty.from_preset("magpie").featurize (tested equal),
    from matminer's own elemental table, but computed for all formulas at once: matminer calls numpy on 2-6
    element arrays 132 times per compound (3.6 ms each, 171 s for the embedded table); this takes seconds.
    `threads` and `progress` are kept for callers; one process is enough now."""
    del threads, progress
    return _featurize_compositions(_compositions(list(formulas)))


def _featurize_compositions(comps: list[list[tuple[Any, float]] | None]) -> tuple[np.ndarray, np.ndarray]:
    """featurize() on parsed formulas (None where parsing failed): the caller that reports why rows were dropped
    parses once and tells unparsable formulas from elements without Magpie data."""
    featurizer = _magpie()
    source, props, stats = featurizer.data_source, list(featurizer.features), list(featurizer.stats)
    n = len(comps)
    # the elemental values, as matminer looks them up (after its NaN imputation); an element it lacks drops its rows
    known: dict[Any, int] = {}
    values = []
    for element in sorted({e for c in comps if c for e, _ in c}, key=lambda e: e.Z):
        try:
            values.append([float(source.get_elemental_property(element, p)) for p in props])
        except Exception:
            continue
        known[element] = len(known)
    table = np.array(values, dtype="float64").reshape(len(known), len(props))
    width = max((len(c) for c in comps if c), default=1)
    index = np.zeros((n, width), dtype=int)
    weight = np.zeros((n, width))
    present = np.zeros((n, width), dtype=bool)
    ok = np.ones(n, dtype=bool)
    for i, c in enumerate(comps):
        if not c or any(e not in known for e, _ in c):
            ok[i] = False
            continue
        for j, (e, amount) in enumerate(c):
            index[i, j], weight[i, j], present[i, j] = known[e], amount, True
    x = table[index]  # [n, elements, props]
    mask, w = present[:, :, None], weight[:, :, None]
    # matminer's PropertyStats: min/max/range are NaN when any value is; mean and avg_dev are np.average with the
    # amounts as weights; mode is the smallest value among the elements of largest amount (np.isclose)
    any_nan = np.any(np.isnan(x) & mask, axis=1)
    minimum = np.where(any_nan, np.nan, np.where(mask, x, np.inf).min(axis=1))
    maximum = np.where(any_nan, np.nan, np.where(mask, x, -np.inf).max(axis=1))
    total = weight.sum(axis=1)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (np.where(mask, x, 0.0) * w).sum(axis=1) / total
        avg_dev = (np.abs(np.where(mask, x - mean[:, None, :], 0.0)) * w).sum(axis=1) / total
        largest = np.isclose(weight, weight.max(axis=1, keepdims=True)) & present
        mode = np.where(largest[:, :, None], x, np.inf).min(axis=1)
        by_stat = {"minimum": minimum, "maximum": maximum, "range": maximum - minimum, "mean": mean,
                   "avg_dev": avg_dev, "mode": mode}
        unknown = set(stats) - set(by_stat)
        if unknown:
            raise ValueError(f"featurize: the magpie preset asks for statistics {sorted(unknown)} this version lacks")
        features = np.stack([by_stat[s][:, p] for p in range(len(props)) for s in stats], axis=1)  # matminer's order
    ok &= np.isfinite(features).all(axis=1)
    features[~ok] = np.nan
    return features, ok


# --- prepare: what the checks found ----------------------------------------------------------


@dataclass
class DataChecks:
    """What `prepare` found in the data: ready.json's `data_checks`, which the diagnostic report's Data section
    shows. Every list is present (empty when nothing applies); `rows` counts rows read, kept and per split."""

    rows: dict[str, int] = field(default_factory=dict)
    dropped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def drop(self, count: int, reason: str, where: str, examples: Sequence[Any] = ()) -> None:
        if not count:
            return
        shown = [str(e) for e in list(examples)[:N_EXAMPLES]]
        self.dropped.append({"count": int(count), "reason": reason, "where": where, "examples": shown})
        log.warning("latent data: %d rows dropped (%s, %s), e.g. %s", count, reason, where, shown)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning("latent data: %s", message)

    def to_dict(self) -> dict:
        return {"rows": dict(self.rows), "dropped": [dict(d) for d in self.dropped],
                "warnings": list(self.warnings), "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: dict) -> DataChecks:
        return cls(dict(d.get("rows") or {}), [dict(x) for x in d.get("dropped") or []],
                   list(d.get("warnings") or []), list(d.get("notes") or []))


# --- prepare: reading ----------------------------------------------------------------------------


def _numeric_or_raise(frame: pd.DataFrame, columns: Sequence[str], key: str, source: str) -> None:
    bad = [c for c in columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if bad:
        raise ValueError(f"{key}: column(s) {bad} in {source} are not numeric")


def _missing_or_raise(frame: pd.DataFrame, columns: Sequence[str], key: str, source: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{key}: column(s) {missing} not found in {source} (it has: {', '.join(map(str, frame.columns[:30]))}"
            f"{', ...' if len(frame.columns) > 30 else ''})"
        )


def _take_limit(frame: pd.DataFrame, limit: int | None, checks: DataChecks) -> pd.DataFrame:
    """The first `limit` rows of a seeded shuffle: a small subset drawn from the whole table
    (the embedded table is sorted by mp_id, so its head is not representative). The index still
    holds each row's position in the source."""
    if limit is None or int(limit) >= len(frame):
        return frame
    if int(limit) < 1:
        raise ValueError(f"data.limit: must be >= 1 or null, got {limit}")
    order = np.random.default_rng(LIMIT_SEED).permutation(len(frame))[: int(limit)]
    checks.notes.append(f"data.limit: a seeded random subset of {int(limit)} of the {len(frame)} rows")
    return frame.iloc[order]


def _ids_and_formulas(frame: pd.DataFrame, id_col: str | None, formula_col: str | None) -> tuple[pd.Series, pd.Series]:
    # a user table may have neither: rows are then named by their position in the file
    if id_col and id_col in frame.columns:
        ids = frame[id_col].astype(str).to_numpy()
    else:
        ids = frame.index.astype(str).to_numpy()
    if formula_col and formula_col in frame.columns:
        # an empty cell is an empty formula, not the text "nan" (which a formula parser might read)
        formulas = frame[formula_col].fillna("").astype(str).str.strip().to_numpy()
    else:
        formulas = np.full(len(frame), "", dtype=object)
    return pd.Series(ids, dtype=object), pd.Series(formulas, dtype=object)


def check_table_path(path: Path) -> None:
    """data.path must be one readable file: a directory, a missing file or a symlink that leads nowhere (a loop)
    is named as such here, at the config check, instead of as an unreadable CSV later."""
    kind = path_kind(path)
    if kind == "loop":
        raise ValueError(f"data.path: {path} is a symlink loop (it points back to itself); "
                         "point data.path at the table file itself")
    if kind == "dangling":
        raise FileNotFoundError(f"data.path: {path} is a symlink to a file that does not exist ({os.readlink(path)})")
    if kind == "folder":
        raise ValueError(f"data.path: {path} is a directory; expected a CSV or parquet file (name the table file in it)")
    if kind == "missing":
        raise FileNotFoundError(f"data.path: file not found: {path}")


# what a file's first bytes say it is, for a table saved under the wrong extension
_MAGIC = (
    (b"PK\x03\x04", "a ZIP archive (an Excel .xlsx workbook is one)"),
    (b"\xd0\xcf\x11\xe0", "an old Excel .xls workbook"),
    (b"PAR1", "a parquet file"),
    (b"\x1f\x8b", "a gzip-compressed file"),
)


def _sniffed_format(path: Path) -> str | None:
    """What kind of binary file `path` is, if its first bytes say so; None for text (or unknown)."""
    with open(path, "rb") as f:
        head = f.read(8)
    kind = next((what for magic, what in _MAGIC if head.startswith(magic)), None)
    if kind and kind.startswith("a ZIP"):
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                if any(n.startswith("xl/") for n in z.namelist()):
                    kind = "an Excel .xlsx workbook"
        except zipfile.BadZipFile:
            pass
    return kind


def _other_separator(path: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """A one-column read whose header holds ';' or a tab: a spreadsheet's export in a locale whose CSV separator
    is not the comma (';' usually with decimal commas, 1,25). Read again with that separator (and decimal commas
    where they make more columns numeric) instead of reporting the targets as missing."""
    header = str(frame.columns[0])
    sep = ";" if ";" in header else "\t" if "\t" in header else None
    if sep is None:
        return frame
    tries = [pd.read_csv(path, sep=sep)] + ([pd.read_csv(path, sep=sep, decimal=",")] if sep == ";" else [])
    return max(tries, key=lambda f: len(f.select_dtypes("number").columns))


def _read_user_file(path: Path) -> pd.DataFrame:
    """The user's table; a file pandas cannot read becomes a ValueError naming it and why."""
    name = path.name.lower()
    is_parquet = name.endswith((".parquet", ".pq"))
    is_csv = name.endswith((".csv", ".csv.gz", ".csv.bz2", ".csv.xz", ".csv.zst"))
    if not (is_parquet or is_csv):
        raise ValueError(f"data.path: {path}: expected a .csv or .parquet file")
    kind = _sniffed_format(path)
    # a workbook or a parquet file renamed .csv would otherwise be read as garbled text ("not UTF-8")
    if name.endswith(".csv") and kind:
        fix = "rename it to .parquet" if kind == "a parquet file" else \
            "name it .csv.gz" if kind.startswith("a gzip") else "export it as CSV (UTF-8) or parquet"
        raise ValueError(f"data.path: {path}: is {kind}, not a CSV text file, despite its .csv name; {fix}")
    try:
        frame = pd.read_parquet(path) if is_parquet else pd.read_csv(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"data.path: {path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"data.path: {path}: the file is empty (no header, no rows)") from None
    except pd.errors.ParserError as e:
        raise ValueError(f"data.path: {path}: not a readable CSV ({str(e).strip()})") from None
    except (OSError, ArithmeticError) as e:
        # pyarrow's errors for a damaged parquet file derive from these
        raise ValueError(f"data.path: {path}: cannot be read ({type(e).__name__}: {e})") from None
    if is_csv and len(frame.columns) == 1:
        frame = _other_separator(path, frame)
    if len(frame) == 0:
        # caught here: an empty table would otherwise surface as "targets are not numeric" (empty columns are text)
        raise ValueError(f"data.path: {path}: has a header ({len(frame.columns)} columns) but no rows")
    return frame


# --- prepare: descriptors ------------------------------------------------------------------------


def _formula_column(frame: pd.DataFrame, cfg: dict) -> str | None:
    """The column holding chemical formulas: data.formula_column, else one named `formula` (the natural name
    in a user's own table, where the default pretty_formula, Materials Project's name, is rarely used)."""
    for name in (cfg.get("formula_column"), FORMULA_FALLBACK):
        if name and name in frame.columns:
            return name
    return None


def _note_text_columns(frame: pd.DataFrame, skip: set, source: str, checks: DataChecks) -> None:
    """Text columns are not descriptors. One that is mostly numbers is a descriptor with a unit or a word typed into
    some cells: warned, since it is silently left out otherwise."""
    for column in frame.columns:
        if column in skip or pd.api.types.is_numeric_dtype(frame[column]):
            continue
        values = frame[column].dropna()
        share = pd.to_numeric(values, errors="coerce").notna().mean() if len(values) else 0.0
        if share >= 0.5:
            bad = values[pd.to_numeric(values, errors="coerce").isna()].astype(str).unique()[:3].tolist()
            checks.warn(f"{source} column {column!r} is mostly numbers but has text cells (e.g. {bad}), so it is "
                        "not used as a descriptor; fix those cells to use it")
        else:
            checks.notes.append(f"column {column!r} of {source} is text: not a descriptor")


def _choose_descriptors(raw: pd.DataFrame, cfg: dict, source: str, checks: DataChecks) -> tuple[list[str] | None, str | None]:
    """(descriptor columns, formula column) of a user table; descriptor columns None means: compute the Magpie
    descriptors from the formula column. Descriptors in the table win over a formula column beside them, which
    then names the rows (the design report's nearest compounds)."""
    targets = list(cfg["targets"])
    formula_col = _formula_column(raw, cfg)
    wanted = cfg.get("descriptor_columns")
    formula_names = f"'{cfg.get('formula_column')}' or '{FORMULA_FALLBACK}'"
    if wanted == MAGPIE:
        if formula_col is None:
            raise ValueError(f"data.descriptor_columns: 'magpie' needs a formula column, and {source} has no column "
                             f"{formula_names}; set data.formula_column to the column holding the formulas")
        return None, formula_col
    if isinstance(wanted, str):
        raise ValueError(f"data.descriptor_columns: expected a list of column names or 'magpie', got {wanted!r}")
    if wanted:
        descriptor_columns = list(wanted)
        _missing_or_raise(raw, descriptor_columns, "data.descriptor_columns", source)
        overlap = sorted(set(descriptor_columns) & set(targets))
        if overlap:
            raise ValueError(f"data.descriptor_columns: {overlap} are also targets (in {source})")
        _numeric_or_raise(raw, descriptor_columns, "data.descriptor_columns", source)
    else:
        not_descriptors = set(targets) | {cfg.get("id_column"), formula_col}
        _note_text_columns(raw, not_descriptors, source, checks)
        descriptor_columns = [c for c in raw.columns if c not in not_descriptors and pd.api.types.is_numeric_dtype(raw[c])]
        if not descriptor_columns:
            if formula_col is not None:
                return None, formula_col
            raise ValueError(
                f"data: {source} has no descriptor columns (numeric columns besides the targets {targets}) and no "
                f"formula column ({formula_names}) to compute Magpie descriptors from; add either, or set "
                "data.formula_column to the column holding the formulas")
    clash = sorted({"id", "formula"} & set(descriptor_columns + targets))
    if clash:
        raise ValueError(f"data.descriptor_columns/targets: {clash} are reserved names in the prepared table")
    return descriptor_columns, formula_col


def _warn_repeated_formulas(formulas: pd.Series, where: str, checks: DataChecks) -> None:
    """Magpie describes the composition only: rows of one formula (repeated measurements, polymorphs) have the same
    inputs, and the random split puts copies of one compound in training and in validation, so the validation
    score says how well the model remembers compounds rather than how it does on new ones."""
    counts = formulas.value_counts()
    repeated = counts[counts > 1]
    if len(repeated):
        shown = ", ".join(f"{f} x{n}" for f, n in repeated.head(N_EXAMPLES).items())
        checks.warn(f"{where}: {len(repeated)} formulas occur more than once ({shown}); their rows have identical "
                    "Magpie descriptors and the random split puts copies of one compound in training and validation, "
                    "so validation scores are optimistic: keep one row per compound (e.g. average its targets)")


def _magpie_descriptors(formulas: pd.Series, ids: pd.Series, where: str, checks: DataChecks) -> tuple[pd.DataFrame, np.ndarray]:
    """The 132 Magpie descriptors of each formula (the embedded data's, by the same featurize()) and the mask of
    rows that have them; empty, unparsable and unfeaturisable formulas are counted apart."""
    from pymatgen.core import Element

    comps = _compositions(formulas.tolist())
    features, ok = _featurize_compositions(comps)
    empty = (formulas == "").to_numpy()
    # pymatgen reads an unknown symbol (Xx) as a dummy species: unparsable for chemistry
    parsed = np.array([c is not None and all(isinstance(e, Element) for e, _ in c) for c in comps], dtype=bool)
    unparsable = ~parsed & ~empty
    no_data = parsed & ~ok
    checks.drop(int(empty.sum()), "empty formula", where, [f"row {i}" for i in ids[empty]])
    checks.drop(int(unparsable.sum()), "unparsable formula", where, formulas[unparsable].unique())
    checks.drop(int(no_data.sum()), "element without Magpie data", where, formulas[no_data].unique())
    if not ok.any():
        raise ValueError(f"data: none of the {len(formulas)} formulas in {where} could be featurised "
                         f"(e.g. {formulas.head(3).tolist()}); write formulas like Bi2Te3 or PbTe")
    labels = magpie_labels()
    checks.notes.append(f"featurised {int(ok.sum())} formulas ({where}) with Magpie ({len(labels)} descriptors)")
    return pd.DataFrame(features, columns=labels), ok


def _drop_duplicate_columns(x: pd.DataFrame, source: str, checks: DataChecks) -> pd.DataFrame:
    """A descriptor column identical to an earlier one adds nothing but weight in the reconstruction loss (and
    is usually a column pasted twice): the copy is dropped, with a warning naming both."""
    hashes = {c: pd.util.hash_array(x[c].to_numpy()).sum() for c in x.columns}
    seen: dict[Any, str] = {}
    dropped = []
    for column in x.columns:
        first = seen.get(hashes[column])
        if first is not None and x[first].equals(x[column]):
            dropped.append(column)
            checks.warn(f"{source} column {column!r} is identical to column {first!r}: dropped as a duplicate "
                        "descriptor; remove one of them from the file")
        else:
            seen.setdefault(hashes[column], column)
    return x.drop(columns=dropped)


def _finite_descriptor_rows(x: pd.DataFrame, ids: pd.Series, source: str, checks: DataChecks) -> np.ndarray:
    """A model cannot take a missing or infinite descriptor: such rows are dropped and counted (missing *targets*
    are fine, the loss masks them)."""
    values = x.to_numpy(dtype="float64")
    missing, infinite = np.isnan(values), np.isinf(values)
    # a row with both counts once, as missing
    rows = {"missing descriptor value": missing.any(axis=1),
            "infinite descriptor value": infinite.any(axis=1) & ~missing.any(axis=1)}
    cells = {"missing descriptor value": missing, "infinite descriptor value": infinite}
    for reason, bad in rows.items():
        columns = x.columns[cells[reason].any(axis=0)].tolist()
        checks.drop(int(bad.sum()), reason, f"{source} columns {columns[:5]}", [f"row {i}" for i in ids[bad]])
    ok = np.isfinite(values).all(axis=1)
    if (~ok).sum() > len(ok) / 2:
        checks.warn(f"{source}: {int((~ok).sum())} of {len(ok)} rows have missing or infinite descriptors and were "
                    "dropped; fill them in or leave the worst columns out (data.descriptor_columns)")
    return ok


# --- prepare: the two sources --------------------------------------------------------------------


def _assemble(ids: pd.Series, formulas: pd.Series, descriptors: pd.DataFrame, targets: pd.DataFrame,
              ok: np.ndarray) -> pd.DataFrame:
    """The prepared table: id, formula, descriptors, targets (raw, physical units), rows in `ok` only."""
    return pd.concat(
        [
            pd.DataFrame({"id": ids[ok].to_numpy(), "formula": formulas[ok].to_numpy()}),
            descriptors[ok].reset_index(drop=True),
            targets[ok].reset_index(drop=True).astype("float64"),
        ],
        axis=1,
    )


def _embedded_table(cfg: dict, checks: DataChecks) -> pd.DataFrame:
    raw = read_embedded_table()
    source = f"the embedded table ({embedded_archive().name})"
    targets = list(cfg["targets"])
    _missing_or_raise(raw, targets, "data.targets", source)
    checks.rows["read"] = len(raw)
    raw = _take_limit(raw, cfg.get("limit"), checks)
    ids, formulas = _ids_and_formulas(raw, "mp_id", "pretty_formula")
    raw = raw.reset_index(drop=True)
    wanted = cfg.get("descriptor_columns")
    if wanted and wanted != MAGPIE:
        unknown = [c for c in wanted if c not in magpie_labels()]
        if unknown:
            raise ValueError(f"data.descriptor_columns: {unknown} are not Magpie descriptors (see feature_labels())")
    descriptors, ok = _magpie_descriptors(formulas, ids, f"{source} column pretty_formula", checks)
    if wanted and wanted != MAGPIE:
        descriptors = descriptors[list(wanted)]
    return _assemble(ids, formulas, descriptors, raw[targets], ok)


def _user_table(cfg: dict, checks: DataChecks) -> pd.DataFrame:
    if not cfg.get("path"):
        raise ValueError("data.path: required when data.source is 'path'")
    path = Path(cfg["path"])
    check_table_path(path)
    raw = _read_user_file(path)
    source = str(path)
    targets = list(cfg["targets"])
    _missing_or_raise(raw, targets, "data.targets", source)
    _numeric_or_raise(raw, targets, "data.targets", source)
    checks.rows["read"] = len(raw)
    descriptor_columns, formula_col = _choose_descriptors(raw, cfg, source, checks)
    raw = _take_limit(raw, cfg.get("limit"), checks)
    ids, formulas = _ids_and_formulas(raw, cfg.get("id_column"), formula_col)
    raw = raw.reset_index(drop=True)
    if descriptor_columns is None:
        descriptors, ok = _magpie_descriptors(formulas, ids, f"{source} column {formula_col}", checks)
        _warn_repeated_formulas(formulas[ok], f"{source} column {formula_col}", checks)
    else:
        descriptors = _drop_duplicate_columns(raw[descriptor_columns].astype("float64"), source, checks)
        ok = _finite_descriptor_rows(descriptors, ids, source, checks)
    return _assemble(ids, formulas, descriptors, raw[targets], ok)


# --- prepare: the checks of the table ------------------------------------------------------------


def _check_targets(table: pd.DataFrame, targets: list[str], source: str, checks: DataChecks) -> dict:
    """Refuse targets no model can learn (infinite values, no values, one value); note the missing ones.
    Returns per target the counts of observed and positive values (the log-target check needs them)."""
    stats = {}
    for t in targets:
        y = table[t]
        infinite = np.isinf(y.to_numpy())
        if infinite.any():
            raise ValueError(f"data.targets: column {t!r} of {source} has {int(infinite.sum())} infinite value(s) "
                             f"(rows with id {table['id'][infinite].head(N_EXAMPLES).tolist()}); fix them or leave "
                             "the cells empty (an empty target is skipped by the loss)")
        observed = y.dropna()
        if observed.empty:
            raise ValueError(f"data.targets: column {t!r} of {source} has no values (every kept row is empty); "
                             "remove it from data.targets")
        if observed.nunique() == 1:
            raise ValueError(f"data.targets: column {t!r} of {source} is constant ({observed.iloc[0]:g} in all "
                             f"{len(observed)} rows with a value): nothing to learn; remove it from data.targets")
        if len(observed) < len(y):
            checks.notes.append(f"target {t!r}: {len(y) - len(observed)} of {len(y)} rows have no value "
                                "(the loss skips them)")
        with np.errstate(over="ignore", invalid="ignore"):
            spread_ok = bool(np.isfinite(observed.to_numpy(dtype="float64").std()))
        # spread_ok: whether the raw values standardise (1e200 does not, its log10 does)
        stats[t] = {"observed": int(len(observed)), "positive": int((observed > 0).sum()), "spread_ok": spread_ok}
    return stats


def _check_magnitudes(table: pd.DataFrame, descriptor_columns: list[str], source: str) -> None:
    """Finite descriptors so large that their spread overflows (1e200) would standardise to NaN, and the run
    would then diverge for a reason no learning rate explains: refused, naming the column."""
    with np.errstate(over="ignore", invalid="ignore"):
        spread = table[descriptor_columns].to_numpy(dtype="float64").std(axis=0)
    bad = [c for c, s in zip(descriptor_columns, spread) if not np.isfinite(s)]
    if bad:
        peak = float(np.abs(table[bad[0]]).max())
        raise ValueError(f"data: descriptor column {bad[0]!r} of {source} has values too large to standardise "
                         f"(up to {peak:.3g}); rescale it (or its log10) or leave it out")


def _correlations(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of every column of x with y, over the rows where both are finite (NaN where undefined)."""
    rows = np.isfinite(y) & np.isfinite(x).all(axis=1)
    if rows.sum() < 3:
        return np.full(x.shape[1], np.nan)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        # scaled to |value| <= 1 first (r does not change): squares of values like 1e200 would overflow
        xs, ys = x[rows] / np.abs(x[rows]).max(axis=0), y[rows] / np.abs(y[rows]).max()
        xc, yc = xs - xs.mean(axis=0), ys - ys.mean()
        return (xc * yc[:, None]).sum(axis=0) / (np.sqrt((xc**2).sum(axis=0)) * np.sqrt((yc**2).sum()))


def _check_leakage(table: pd.DataFrame, descriptor_columns: list[str], targets: list[str], source: str) -> None:
    """A descriptor that is a target (a copy, a rescaled copy, its log10 or the copy with tiny noise) would give
    a near-perfect score that says nothing about the compounds: refused, naming both columns."""
    x = table[descriptor_columns].to_numpy(dtype="float64")
    for t in targets:
        y = table[t].to_numpy(dtype="float64")
        with np.errstate(invalid="ignore", divide="ignore"):
            logged = np.where(y > 0, np.log10(np.where(y > 0, y, 1.0)), np.nan)
        for values, how in ((y, ""), (logged, " of log10")):
            r = np.abs(_correlations(x, values))
            if np.nanmax(r, initial=0.0) >= LEAK_R:
                j = int(np.nanargmax(r))
                raise ValueError(
                    f"data: descriptor column {descriptor_columns[j]!r} of {source} is target {t!r} again "
                    f"(|Pearson r|{how} = {r[j]:.4f} >= {LEAK_R}): target leakage, a model would read the answer "
                    "from its input; remove the column or list the real descriptors in data.descriptor_columns")


def split_sizes(n: int, val: float, test: float) -> dict[str, int]:
    """Rows per split for n rows: a non-zero share keeps at least one row (split_indices' rule)."""
    n_test = max(1, round(test * n)) if test > 0 else 0
    n_val = max(1, round(val * n)) if val > 0 else 0
    return {"train": n - n_test - n_val, "val": n_val, "test": n_test}


def _enough(sizes: dict[str, int], val: float, test: float) -> bool:
    shares = {"train": 1.0, "val": val, "test": test}
    return all(sizes[s] >= MIN_SPLIT_ROWS[s] for s in SPLITS if shares[s] > 0)


def min_rows(val: float, test: float) -> int:
    """The fewest rows that give every split with a non-zero share its minimum (MIN_SPLIT_ROWS)."""
    n = sum(MIN_SPLIT_ROWS[s] for s, share in (("train", 1), ("val", val), ("test", test)) if share > 0)
    for share, least in ((val, MIN_SPLIT_ROWS["val"]), (test, MIN_SPLIT_ROWS["test"])):
        if share > 0:
            n = max(n, int((least - 0.5) / share))  # a lower bound (round() may give the share one row more)
    while not _enough(split_sizes(n, val, test), val, test):
        n += 1
    return n


def _split_rows(n: int, split_cfg: dict, source: str) -> dict[str, int]:
    """Rows per split; too few rows for the split are refused with the numbers (a validation R^2 over two rows
    decides nothing, and an empty split would only fail later, in training)."""
    val, test = check_split(split_cfg)
    sizes = split_sizes(n, val, test)
    if not _enough(sizes, val, test):
        least = min_rows(val, test)
        raise ValueError(
            f"data: {n} usable rows in {source} are too few for data.split (val={val}, test={test}): it needs at "
            f"least {least} rows (train >= {MIN_SPLIT_ROWS['train']}, val and test >= {MIN_SPLIT_ROWS['val']} each); "
            "add rows or change data.split")
    return sizes


def _check_log_targets(stats: dict, cfg: dict, source: str, checks: DataChecks) -> None:
    """Targets in data.log_targets are trained as log10: a value <= 0 has no log and becomes missing. All of them
    is refused; some of them is warned. A target trained as it is must standardise (values of 1e200 would give
    NaN losses, a divergence no learning rate explains). data.log_targets is not in the cache key, so this runs
    on every call."""
    log_targets = set(cfg.get("log_targets") or [])
    for t in [t for t in cfg["targets"] if t not in log_targets and not stats[t].get("spread_ok", True)]:
        raise ValueError(f"data.targets: column {t!r} of {source} has values too large to standardise; rescale it "
                         "or add it to data.log_targets")
    for t in [t for t in cfg["targets"] if t in log_targets]:
        observed, positive = stats[t]["observed"], stats[t]["positive"]
        if positive == 0:
            raise ValueError(f"data.log_targets: target {t!r} of {source} has no value > 0, so its log10 is empty; "
                             "remove it from data.log_targets")
        if positive < observed:
            checks.warn(f"{source} column {t!r}: {observed - positive} of {observed} values are <= 0 and have no "
                        f"log10, so they count as missing; remove {t!r} from data.log_targets to keep them")


def _source_name(cfg: dict) -> str:
    return str(cfg["path"]) if cfg["source"] == "path" else "the embedded table"


def _write_parquet_atomic(table: pd.DataFrame, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        table.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_meta(out_dir: Path) -> dict | None:
    path = Path(out_dir) / META
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _build(cfg: dict, digest: str) -> tuple[pd.DataFrame, dict]:
    """The prepared table of the config's source, checked, and its meta (data_checks without the split)."""
    started = time.perf_counter()
    checks = DataChecks()
    if cfg["source"] == "embedded":
        table = _embedded_table(cfg, checks)
    elif cfg["source"] == "path":
        table = _user_table(cfg, checks)
    else:
        raise ValueError(f"data.source: expected 'embedded' or 'path', got {cfg['source']!r}")
    source = _source_name(cfg)
    if len(table) == 0:
        raise ValueError(f"data: no usable rows in {source} ({sum(d['count'] for d in checks.dropped)} dropped)")
    targets = list(cfg["targets"])
    descriptor_columns = [c for c in table.columns if c not in ("id", "formula") and c not in targets]
    target_stats = _check_targets(table, targets, source, checks)
    _check_magnitudes(table, descriptor_columns, source)
    _check_leakage(table, descriptor_columns, targets, source)
    checks.rows["kept"] = len(table)
    meta = {
        "source": cfg["source"],
        "path": str(cfg["path"]) if cfg["source"] == "path" else None,
        "n_rows": int(len(table)),
        "n_dropped": sum(d["count"] for d in checks.dropped),
        "descriptor_columns": descriptor_columns,
        "target_columns": targets,
        "target_stats": target_stats,
        "data_checks": checks.to_dict(),
        "seconds": round(time.perf_counter() - started, 3),
        "fingerprint": digest,
    }
    return table, meta


def prepare(data_cfg: dict, out_dir: Path, threads: int = 1) -> dict:
    """Build out_dir/table.parquet and out_dir/meta.json for the data config; reuse them when meta.json carries
    the same fingerprint. Returns meta, whose data_checks (what was read, dropped, warned) are the same for a
    cached table; their split counts and the log-target warnings follow data.split and data.log_targets, which
    are not in the fingerprint, so they are recomputed on every call. A refusal is a ValueError, before any
    file is written."""
    del threads  # featurize needs one process
    cfg = resolve_data_config(data_cfg)
    out_dir = Path(out_dir)
    digest = fingerprint(cfg)
    meta = read_meta(out_dir)
    cached = meta is not None and meta.get("fingerprint") == digest and (out_dir / TABLE).exists()
    table = None
    if not cached:
        table, meta = _build(cfg, digest)
    source = _source_name(cfg)
    checks = DataChecks.from_dict(meta["data_checks"])
    # the data's own problems first: too few rows is a matter of the split as well
    _check_log_targets(meta["target_stats"], cfg, source, checks)
    checks.rows.update(_split_rows(meta["n_rows"], cfg["split"], source))
    meta = {**meta, "data_checks": checks.to_dict()}
    if table is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_parquet_atomic(table, out_dir / TABLE)
        # meta.json last: its presence (with this fingerprint) means the table is complete
        write_json(out_dir / META, meta)
    return meta


# --- splits and scaling ------------------------------------------------------------------------


def to_log_space(y_raw: np.ndarray, log_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log10 of the columns in log_mask (heavy-tailed properties). Values <= 0 have no log and
    become NaN. Returns (y, count of such values per column)."""
    y = np.array(y_raw, dtype="float64", copy=True)
    logged = y[:, log_mask]
    nonpositive = logged <= 0  # NaN compares False: already-missing values are not counted
    counts = np.zeros(y.shape[1], dtype=int)
    counts[log_mask] = nonpositive.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        y[:, log_mask] = np.where(nonpositive, np.nan, np.log10(logged))
    return y, counts



@dataclass
class Scaler:
    """Standardisation fitted on the train split; targets in `log_targets` are log10 first."""

    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: np.ndarray
    y_std: np.ndarray
    target_columns: list[str]
    log_targets: list[str]  # the targets (of target_columns) that are stored as log10

    @property
    def log_mask(self) -> np.ndarray:
        return np.array([t in self.log_targets for t in self.target_columns], dtype=bool)

    def transform_x(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype="float64") - self.x_mean) / self.x_std

    def transform_y(self, y_raw: np.ndarray) -> np.ndarray:
        """Physical target values -> standardised (log10 first where configured)."""
        return (to_log_space(y_raw, self.log_mask)[0] - self.y_mean) / self.y_std

    def inverse_x(self, x_std: Any) -> Any:
        """Standardised descriptors (e.g. a decoded latent) back to descriptor units."""
        return _affine(x_std, self.x_std, self.x_mean)

    def inverse_y(self, y_std: Any) -> Any:
        """Standardised predictions [N, tasks] -> physical units (undo standardisation and log10).
        A torch tensor comes back as a tensor on its device, anything else as a float64 array."""
        y = _affine(y_std, self.y_std, self.y_mean)
        mask = self.log_mask
        if _is_tensor(y):
            import torch

            m = torch.as_tensor(mask, device=y.device)
            return torch.where(m, torch.pow(10.0, y), y)
        return np.where(mask, np.power(10.0, y), y)

    def to_dict(self) -> dict:
        return {
            "x_mean": self.x_mean.tolist(),
            "x_std": self.x_std.tolist(),
            "y_mean": self.y_mean.tolist(),
            "y_std": self.y_std.tolist(),
            "target_columns": list(self.target_columns),
            "log_targets": list(self.log_targets),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Scaler:
        arrays = {k: np.asarray(d[k], dtype="float64") for k in ("x_mean", "x_std", "y_mean", "y_std")}
        return cls(**arrays, target_columns=list(d["target_columns"]), log_targets=list(d["log_targets"]))


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "device")


def _affine(value: Any, scale: np.ndarray, shift: np.ndarray) -> Any:
    if _is_tensor(value):
        import torch

        s = torch.as_tensor(scale, dtype=value.dtype, device=value.device)
        b = torch.as_tensor(shift, dtype=value.dtype, device=value.device)
        return value * s + b
    return np.asarray(value, dtype="float64") * scale + shift


@dataclass
class Splits:
    x: dict[str, torch.Tensor]  # standardised descriptors, float32 [n, n_descriptors]
    y: dict[str, torch.Tensor]  # standardised targets, float32 [n, n_targets], NaN = missing
    ids: dict[str, list[str]]
    formulas: dict[str, list[str]]
    descriptor_columns: list[str]
    target_columns: list[str]
    scaler: Scaler
    # per target: values <= 0 of a log target, set to NaN (all splits together)
    n_nonpositive: dict[str, int] = field(default_factory=dict)


def check_split(split_cfg: dict) -> tuple[float, float]:
    """(val, test) shares of data.split, or a ValueError naming the key (the config check runs this too, so
    a split that leaves no training rows stops the workflow before the data is prepared)."""
    unknown = sorted(set(split_cfg) - {"val", "test", "seed"})
    if unknown:
        raise ValueError(f"data.split: unknown key(s) {unknown}; known: seed, test, val")
    try:
        val, test = float(split_cfg.get("val", 0.1)), float(split_cfg.get("test", 0.1))
        int(split_cfg.get("seed", 0))
    except (TypeError, ValueError):
        raise ValueError(f"data.split: val and test must be numbers and seed an integer, got {split_cfg}") from None
    if val < 0 or test < 0 or val + test >= 1:
        raise ValueError(f"data.split: val and test must be >= 0 with val + test < 1, got val={val}, test={test}")
    return val, test


def split_indices(n: int, split_cfg: dict) -> dict[str, np.ndarray]:
    """Row indices per split from a permutation seeded by split.seed alone, so every training
    seed sees the same partition."""
    val, test = check_split(split_cfg)
    order = np.random.default_rng(int(split_cfg.get("seed", 0))).permutation(n)
    # a non-zero share keeps at least one row, as long as train keeps one too
    sizes = split_sizes(n, val, test)
    n_test, n_val = sizes["test"], sizes["val"]
    if sizes["train"] < 1:
        raise ValueError(f"data.split: {n} rows leave no training rows (val={val}, test={test})")
    return {
        "test": np.sort(order[:n_test]),
        "val": np.sort(order[n_test : n_test + n_val]),
        "train": np.sort(order[n_test + n_val :]),
    }


def _fit_scaler(x_train: np.ndarray, y_train: np.ndarray, targets: list[str], log_targets: list[str]) -> Scaler:
    x_mean = x_train.mean(axis=0)
    x_std = x_train.std(axis=0)
    # a descriptor constant over the train split carries nothing: scale 1 keeps it finite
    x_std = np.where(x_std > 0, x_std, 1.0)
    observed = np.isfinite(y_train).sum(axis=0)
    empty = [t for t, n in zip(targets, observed) if n == 0]
    if empty:
        raise ValueError(f"data.targets: {empty} have no observed (positive, for log targets) values in the train split")
    with np.errstate(invalid="ignore"):
        y_mean = np.nanmean(y_train, axis=0)
        y_std = np.nanstd(y_train, axis=0)
    y_std = np.where(y_std > 0, y_std, 1.0)
    return Scaler(x_mean, x_std, y_mean, y_std, targets, log_targets)


def load_splits(out_dir: Path, data_cfg: dict) -> Splits:
    """Standardised train/val/test tensors from the table `prepare` wrote in out_dir."""
    import torch

    cfg = resolve_data_config(data_cfg)
    out_dir = Path(out_dir)
    meta = read_meta(out_dir)
    if meta is None or not (out_dir / TABLE).exists():
        raise FileNotFoundError(f"data.prepared_dir: no prepared table in {out_dir} (run prepare first)")
    if meta["target_columns"] != list(cfg["targets"]):
        raise ValueError(
            f"data.targets: {cfg['targets']} but {out_dir} was prepared for {meta['target_columns']}; prepare again"
        )
    table = pd.read_parquet(out_dir / TABLE)
    descriptors, targets = list(meta["descriptor_columns"]), list(meta["target_columns"])
    log_targets = [t for t in targets if t in set(cfg["log_targets"] or [])]
    index = split_indices(len(table), cfg["split"])

    x_all = table[descriptors].to_numpy(dtype="float64")
    y_all = table[targets].to_numpy(dtype="float64")
    y_log, nonpositive = to_log_space(y_all, np.array([t in log_targets for t in targets], dtype=bool))
    n_nonpositive = {t: int(c) for t, c in zip(targets, nonpositive) if c}
    if n_nonpositive:
        log.warning("latent data: values <= 0 of log targets treated as missing: %s", n_nonpositive)
    train = index["train"]
    scaler = _fit_scaler(x_all[train], y_log[train], targets, log_targets)

    x_std = (x_all - scaler.x_mean) / scaler.x_std
    y_std = (y_log - scaler.y_mean) / scaler.y_std
    ids = table["id"].astype(str).to_numpy()
    formulas = table["formula"].astype(str).to_numpy()
    return Splits(
        x={s: torch.as_tensor(x_std[index[s]], dtype=torch.float32) for s in SPLITS},
        y={s: torch.as_tensor(y_std[index[s]], dtype=torch.float32) for s in SPLITS},
        ids={s: ids[index[s]].tolist() for s in SPLITS},
        formulas={s: formulas[index[s]].tolist() for s in SPLITS},
        descriptor_columns=descriptors,
        target_columns=targets,
        scaler=scaler,
        n_nonpositive=n_nonpositive,
    )
