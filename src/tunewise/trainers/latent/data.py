"""Data for the `latent` trainer: a table of material descriptors and properties.

`prepare` turns the configured source into `table.parquet` + `meta.json` once (cached by a
fingerprint of the data config); `load_splits` turns that table into standardised tensors
split train/val/test, every run.

Embedded default: the Materials Project transport table that ships inside matminer
(Ricci et al. 2017, 47,737 compounds), featurised with Magpie element statistics. A user's
own CSV/parquet with descriptor and target columns is read as it is.
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
TABLE_FORMAT = 1
# keys that do not change table.parquet: noise is used by training, split and log_targets by
# load_splits, prepared_dir is where the table lives. Changing them must not redo featurisation.
NOT_IN_TABLE = ("noise", "split", "log_targets", "prepared_dir")
# a fixed seed for the `limit` subset, independent of split.seed: the table must not depend on it
LIMIT_SEED = 0
EMBEDDED_ARCHIVE = ("utils", "data_files", "mp_transport", "transport_database.tar.xz")
EMBEDDED_MEMBER = "transport_database.csv"


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
    formulas = list(formulas)
    featurizer = _magpie()
    source, props, stats = featurizer.data_source, list(featurizer.features), list(featurizer.stats)
    n = len(formulas)
    comps = _compositions(formulas)
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


# --- prepare ---------------------------------------------------------------------------------


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


def _take_limit(frame: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """The first `limit` rows of a seeded shuffle: a small subset drawn from the whole table
    (the embedded table is sorted by mp_id, so its head is not representative). The index still
    holds each row's position in the source."""
    if limit is None or int(limit) >= len(frame):
        return frame
    if int(limit) < 1:
        raise ValueError(f"data.limit: must be >= 1 or null, got {limit}")
    order = np.random.default_rng(LIMIT_SEED).permutation(len(frame))[: int(limit)]
    return frame.iloc[order]


def _ids_and_formulas(frame: pd.DataFrame, cfg: dict) -> tuple[pd.Series, pd.Series]:
    id_col, formula_col = cfg["id_column"], cfg["formula_column"]
    # a user table may have neither: rows are then named by their position in the file
    if id_col and id_col in frame.columns:
        ids = frame[id_col].astype(str).to_numpy()
    else:
        ids = frame.index.astype(str).to_numpy()
    if formula_col and formula_col in frame.columns:
        formulas = frame[formula_col].astype(str).to_numpy()
    else:
        formulas = np.full(len(frame), "", dtype=object)
    return pd.Series(ids, dtype=object), pd.Series(formulas, dtype=object)


def _embedded_table(cfg: dict, threads: int) -> tuple[pd.DataFrame, int]:
    raw = read_embedded_table()
    source = f"the embedded table ({embedded_archive().name})"
    targets = list(cfg["targets"])
    _missing_or_raise(raw, targets, "data.targets", source)
    raw = _take_limit(raw, cfg.get("limit"))
    ids, formulas = _ids_and_formulas(raw, {**cfg, "id_column": "mp_id", "formula_column": "pretty_formula"})
    raw = raw.reset_index(drop=True)
    labels = magpie_labels()
    wanted = cfg.get("descriptor_columns")
    if wanted:
        unknown = [c for c in wanted if c not in labels]
        if unknown:
            raise ValueError(f"data.descriptor_columns: {unknown} are not Magpie descriptors (see feature_labels())")
    features, ok = featurize(formulas.tolist(), threads=threads)
    n_dropped = int((~ok).sum())
    if n_dropped:
        examples = formulas[~ok].head(5).tolist()
        log.warning("latent data: %d of %d formulas could not be featurised and were dropped (e.g. %s)",
                    n_dropped, len(formulas), examples)
    descriptors = pd.DataFrame(features[ok], columns=labels)
    if wanted:
        descriptors = descriptors[list(wanted)]
    table = pd.concat(
        [
            pd.DataFrame({"id": ids[ok].to_numpy(), "formula": formulas[ok].to_numpy()}),
            descriptors,
            raw.loc[ok, targets].reset_index(drop=True).astype("float64"),
        ],
        axis=1,
    )
    return table, n_dropped


def _read_user_file(path: Path) -> pd.DataFrame:
    """The user's table; a file pandas cannot read becomes a ValueError naming it and why."""
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            frame = pd.read_parquet(path)
        elif name.endswith((".csv", ".csv.gz", ".csv.bz2", ".csv.xz", ".csv.zst")):
            frame = pd.read_csv(path)
        else:
            raise ValueError(f"data.path: {path}: expected a .csv or .parquet file")
    except UnicodeDecodeError as e:
        raise ValueError(f"data.path: {path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"data.path: {path}: the file is empty (no header, no rows)") from None
    except pd.errors.ParserError as e:
        raise ValueError(f"data.path: {path}: not a readable CSV ({str(e).strip()})") from None
    except (OSError, ArithmeticError) as e:
        # pyarrow's errors for a damaged parquet file derive from these
        raise ValueError(f"data.path: {path}: cannot be read ({type(e).__name__}: {e})") from None
    if len(frame) == 0:
        # caught here: an empty table would otherwise surface as "targets are not numeric" (empty columns are text)
        raise ValueError(f"data.path: {path}: has a header ({len(frame.columns)} columns) but no rows")
    return frame


def _user_table(cfg: dict) -> tuple[pd.DataFrame, int]:
    if not cfg.get("path"):
        raise ValueError("data.path: required when data.source is 'path'")
    path = Path(cfg["path"])
    if not path.is_file():
        raise FileNotFoundError(f"data.path: file not found: {path}")
    raw = _read_user_file(path)
    source = str(path)
    targets = list(cfg["targets"])
    _missing_or_raise(raw, targets, "data.targets", source)
    _numeric_or_raise(raw, targets, "data.targets", source)
    not_descriptors = set(targets) | {cfg.get("id_column"), cfg.get("formula_column")}
    if cfg.get("descriptor_columns"):
        descriptor_columns = list(cfg["descriptor_columns"])
        _missing_or_raise(raw, descriptor_columns, "data.descriptor_columns", source)
        overlap = sorted(set(descriptor_columns) & set(targets))
        if overlap:
            raise ValueError(f"data.descriptor_columns: {overlap} are also targets (in {source})")
        _numeric_or_raise(raw, descriptor_columns, "data.descriptor_columns", source)
    else:
        descriptor_columns = [
            c for c in raw.columns if c not in not_descriptors and pd.api.types.is_numeric_dtype(raw[c])
        ]
        if not descriptor_columns:
            raise ValueError(f"data.descriptor_columns: {source} has no numeric column besides the targets")
    clash = sorted({"id", "formula"} & set(descriptor_columns + targets))
    if clash:
        raise ValueError(f"data.descriptor_columns/targets: {clash} are reserved names in the prepared table")
    raw = _take_limit(raw, cfg.get("limit"))
    ids, formulas = _ids_and_formulas(raw, cfg)
    raw = raw.reset_index(drop=True)
    x = raw[descriptor_columns].to_numpy(dtype="float64")
    # a model cannot take a missing descriptor: such rows are dropped and counted, like
    # formulas that fail to featurise (missing *targets* are fine, the loss masks them)
    ok = np.isfinite(x).all(axis=1)
    n_dropped = int((~ok).sum())
    if n_dropped:
        log.warning("latent data: %d of %d rows of %s have missing/non-finite descriptors and were dropped",
                    n_dropped, len(raw), source)
    table = pd.concat(
        [
            pd.DataFrame({"id": ids[ok].to_numpy(), "formula": formulas[ok].to_numpy()}),
            pd.DataFrame(x[ok], columns=descriptor_columns),
            raw.loc[ok, targets].reset_index(drop=True).astype("float64"),
        ],
        axis=1,
    )
    return table, n_dropped


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


def prepare(data_cfg: dict, out_dir: Path, threads: int = 1) -> dict:
    """Build out_dir/table.parquet and out_dir/meta.json for the data config; reuse them when
    meta.json carries the same fingerprint. Returns meta."""
    cfg = resolve_data_config(data_cfg)
    out_dir = Path(out_dir)
    digest = fingerprint(cfg)
    meta = read_meta(out_dir)
    if meta is not None and meta.get("fingerprint") == digest and (out_dir / TABLE).exists():
        return meta
    started = time.perf_counter()
    if cfg["source"] == "embedded":
        table, n_dropped = _embedded_table(cfg, threads=max(1, int(threads)))
    elif cfg["source"] == "path":
        table, n_dropped = _user_table(cfg)
    else:
        raise ValueError(f"data.source: expected 'embedded' or 'path', got {cfg['source']!r}")
    if len(table) == 0:
        raise ValueError(f"data: no usable rows ({n_dropped} dropped)")
    targets = list(cfg["targets"])
    descriptor_columns = [c for c in table.columns if c not in ("id", "formula") and c not in targets]
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_parquet_atomic(table, out_dir / TABLE)
    meta = {
        "source": cfg["source"],
        "path": str(cfg["path"]) if cfg["source"] == "path" else None,
        "n_rows": int(len(table)),
        "n_dropped": n_dropped,
        "descriptor_columns": descriptor_columns,
        "target_columns": targets,
        "seconds": round(time.perf_counter() - started, 3),
        "fingerprint": digest,
    }
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
    n_test = max(1, round(test * n)) if test > 0 else 0
    n_val = max(1, round(val * n)) if val > 0 else 0
    if n - n_test - n_val < 1:
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
