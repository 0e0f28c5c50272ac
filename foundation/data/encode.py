"""Feature encoding: raw sample values -> table rows and transformed numerics, vectorised with numpy.

One :class:`FeatureEncoder` per :class:`~recfm.scenarios.spec.FeatureSpec`. It turns a flat Arrow array of
one feature's values (one value per token) into what the model reads:

==============================  ==========================================================  ============
feature                         output                                                       null value
==============================  ==========================================================  ============
categorical, ``hashed``         ``1 + mix64(id) % (size - 1)``: rows 1..size-1               row 0
categorical, ``identity``       the id itself; ``0 <= id < size`` else :class:`DataError`    row 0
categorical, ``file``           ``1 + line number`` of the id in the vocabulary file;        row 0
                                ids not in the file -> row 0 (unknown)
numeric ``none``                ``x``                                                        0.0
numeric ``log``                 ``sign(x) * log1p(|x|)``                                     0.0
numeric ``standard``            ``(x - mean) / std``                                         0.0 (= mean)
numeric ``bucketize``           ``searchsorted(boundaries, x, side="right")``: rows 0..len   row 0
dense                           the vector, ``[n, length]``; wrong length -> DataError        zeros
==============================  ==========================================================  ============

Row 0 of every categorical table is the *missing* row: nulls land there, and so do unknown ids of a file
vocabulary. Hashed ids never land on row 0, so ``size - 1`` rows are left for them (a hashed vocabulary
needs ``size >= 2``). Identity vocabularies use their ids unchanged; a dataset with missing identity ids
should shift its ids by one so that 0 means missing.

Non-finite numerics (NaN, +-inf) are an error, not a silent zero: :class:`DataError` names the scenario or
sequence, the feature and the first offending value and sample row. Bucketised numerics are embedded, so
they are a *sparse* output; the other numerics are *numeric* columns; dense vectors are
*dense* columns. Timestamp features are not encoded (the adapters do not read them: time enters the model
through ``Batch.timestamps``); :class:`GroupEncoder` skips them.

**The hash.** ``mix64`` is the splitmix64 finaliser applied to the id's 64 bits (``z += 0x9E3779B97F4A7C15;
z = (z ^ z>>30) * 0xBF58476D1CE4E5B9; z = (z ^ z>>27) * 0x94D049BB133111EB; z ^= z>>31``, all modulo
2**64). It has no seed and no per-table salt: the same id lands on the same row of a table of the same size
in every scenario, sequence, process and machine. String ids were turned into int64 ids by the sample
builder (:func:`recfm.foundation.data.build_convert.stable_hash`); vocabulary files use the same function
(:func:`string_ids`), so a string id means the same row everywhere.

**Vocabulary files.** UTF-8 text, one id per line; blank lines are ignored; a line that is an integer
literal (``-7``, ``42``) is that int64 id, any other line is a string id (mapped with :func:`string_ids`),
the builder's rule for raw id columns. The id on the
i-th non-blank line (0-based) maps to row ``i + 1``; the file needs ``size >= lines + 1``. A relative
``vocab.path`` is resolved against the folder of the YAML file that declared it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recfm.errors import ConfigError, DataError
from recfm.scenarios.spec import FeatureSpec, FeatureType, NumericTransform, VocabKind, resolve_path

MISSING_ROW = 0

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(ids: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of int64 (or uint64) ids ``[n]`` -> uint64 ``[n]`` (pure, seedless)."""
    z = np.asarray(ids).astype(np.int64, copy=False).view(np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash_rows(ids: np.ndarray, size: int) -> np.ndarray:
    """Rows ``1..size-1`` of a hashed table for int64 ids ``[n]`` -> int64 ``[n]`` (row 0 is for nulls)."""
    return (mix64(ids) % np.uint64(size - 1)).astype(np.int64) + 1


def string_ids(values: Iterable[str]) -> np.ndarray:
    """int64 ids of string ids ``[n]``, exactly as the sample builder hashes raw string ids."""
    from recfm.foundation.data.build_convert import stable_hash  # the builder's function is the definition

    return stable_hash(pa.array(list(values), pa.string())).to_numpy(zero_copy_only=False).astype(np.int64)


_INT = re.compile(r"^[+-]?[0-9]{1,19}$")


def load_vocab_file(path: Path, where: str = "vocab") -> np.ndarray:
    """The int64 ids of a vocabulary file in file order (``[lines]``); row of ``ids[i]`` is ``i + 1``."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except OSError as e:
        raise ConfigError([f"{where}.vocab.path: cannot read vocabulary file {path}: {e.strerror or e}"]) from e
    lines = [line for line in lines if line]
    ids = np.empty(len(lines), dtype=np.int64)
    strings: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        value = int(line) if _INT.match(line) else None
        if value is not None and -(2**63) <= value < 2**63:
            ids[i] = value
        else:
            strings.append((i, line))
    if strings:
        ids[[i for i, _ in strings]] = string_ids(s for _, s in strings)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = lines[int(np.nonzero(ids == uniq[counts > 1][0])[0][1])]
        raise ConfigError([f"{where}.vocab.path: {path}: id {dup!r} is listed more than once"])
    return ids


class Output(str, enum.Enum):
    """Where an encoded feature goes in a :class:`~recfm.foundation.data.batch.TokenGroup`."""

    SPARSE = "sparse"  # int64 table rows [n] -> the group's KeyedJaggedTensor
    NUMERIC = "numeric"  # float32 [n] -> one column of ``numeric``
    DENSE = "dense"  # float32 [n, length] -> columns of ``dense``


def _output(spec: FeatureSpec) -> Output:
    if spec.is_embedded:
        return Output.SPARSE
    if spec.type is FeatureType.DENSE:
        return Output.DENSE
    return Output.NUMERIC


def _where_row(rows: np.ndarray | None, i: int) -> str:
    return f"sample row {int(rows[i])}" if rows is not None else f"token {i}"


class FeatureEncoder:
    """Encodes one feature's flat values (one per token).

    Args:
        spec: the feature.
        where: what to call it in messages, e.g. ``"scenario 'coupons' feature 'shop_id'"``.
        base_file: the YAML file that declared it (relative vocabulary paths are resolved against it).
    """

    def __init__(self, spec: FeatureSpec, where: str, base_file: str = "<memory>"):
        if spec.type is FeatureType.TIMESTAMP:
            raise ValueError(f"{where}: timestamp features are not encoded")
        self.spec = spec
        self.where = where
        self.output = _output(spec)
        self.width = int(spec.length or 0) if self.output is Output.DENSE else 1
        self._vocab_keys = self._vocab_rows = None
        problems = []
        if spec.type is FeatureType.CATEGORICAL:
            if spec.vocab is None or spec.vocab.size < 1:
                problems.append(f"{where}: a categorical feature needs a vocab with size >= 1")
            elif spec.vocab.kind is VocabKind.HASHED and spec.vocab.size < 2:
                problems.append(f"{where}.vocab.size: a hashed vocabulary needs size >= 2 (row 0 is for nulls)")
            elif spec.vocab.kind is VocabKind.FILE:
                self._load_file(base_file, problems)
        elif spec.type is FeatureType.NUMERIC:
            b = np.asarray(spec.boundaries, dtype=np.float64)
            if spec.transform is NumericTransform.BUCKETIZE and (b.size == 0 or (np.diff(b) <= 0).any()):
                problems.append(f"{where}.boundaries: bucketize needs strictly increasing boundaries")
            if spec.transform is NumericTransform.STANDARD and not spec.std > 0:
                problems.append(f"{where}.std: must be > 0")
        elif spec.type is FeatureType.DENSE and not (spec.length or 0) > 0:
            problems.append(f"{where}.length: a dense feature needs length > 0")
        if problems:
            raise ConfigError([f"{base_file}: {p}" for p in problems])

    def _load_file(self, base_file: str, problems: list[str]) -> None:
        vocab = self.spec.vocab
        if not vocab.path:
            problems.append(f"{self.where}.vocab.path: a file vocabulary needs a path")
            return
        ids = load_vocab_file(resolve_path(base_file, vocab.path), f"{base_file}: {self.where}")
        if ids.size + 1 > vocab.size:
            problems.append(f"{self.where}.vocab.size: {vocab.size} rows cannot hold {ids.size} ids + row 0")
        order = np.argsort(ids, kind="stable")
        self._vocab_keys, self._vocab_rows = ids[order], order.astype(np.int64) + 1

    def encode(self, values: pa.Array, rows: np.ndarray | None = None) -> np.ndarray:
        """Encode ``[n]`` values.

        Args:
            values: flat Arrow array, one value per token (nulls allowed, see the module table).
            rows: ``[n]`` sample row of each value, used only to name the row in error messages.

        Returns:
            int64 ``[n]`` (sparse), float32 ``[n]`` (numeric) or float32 ``[n, length]`` (dense).
        """
        if self.output is Output.DENSE:
            return self._dense(values, rows)
        valid = np.asarray(values.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        raw = pc.fill_null(values, 0).to_numpy(zero_copy_only=False) if len(values) else np.zeros(0)
        spec = self.spec
        if spec.type is FeatureType.CATEGORICAL:
            return np.where(valid, self._categorical(raw.astype(np.int64, copy=False), valid, rows), MISSING_ROW)
        x = raw.astype(np.float64)
        self._check_finite(x, valid, rows)
        if spec.transform is NumericTransform.BUCKETIZE:
            b = np.asarray(spec.boundaries, dtype=np.float64)
            return np.where(valid, np.searchsorted(b, x, side="right"), MISSING_ROW).astype(np.int64)
        if spec.transform is NumericTransform.LOG:
            x = np.sign(x) * np.log1p(np.abs(x))
        elif spec.transform is NumericTransform.STANDARD:
            x = (x - spec.mean) / spec.std
        return np.where(valid, x, 0.0).astype(np.float32)

    def _categorical(self, ids: np.ndarray, valid: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
        vocab = self.spec.vocab
        if vocab.kind is VocabKind.HASHED:
            return hash_rows(ids, vocab.size)
        if vocab.kind is VocabKind.IDENTITY:
            bad = valid & ((ids < 0) | (ids >= vocab.size))
            if bad.any():
                i = int(np.argmax(bad))
                raise DataError(
                    f"{self.where}: id {int(ids[i])} at {_where_row(rows, i)} is outside the identity vocabulary "
                    f"[0, {vocab.size}) ({int(bad.sum())} such value(s); use a hashed vocabulary or a larger size)"
                )
            return ids
        keys = self._vocab_keys
        if keys.size == 0:
            return np.zeros_like(ids)
        pos = np.minimum(np.searchsorted(keys, ids), keys.size - 1)
        return np.where(keys[pos] == ids, self._vocab_rows[pos], MISSING_ROW)

    def _check_finite(self, x: np.ndarray, valid: np.ndarray, rows: np.ndarray | None) -> None:
        bad = valid & ~np.isfinite(x)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(
                f"{self.where}: non-finite value {x[i]} at {_where_row(rows, i)} ({int(bad.sum())} such value(s))"
            )

    def _dense(self, values: pa.Array, rows: np.ndarray | None) -> np.ndarray:
        n, width = len(values), self.width
        lengths = pc.fill_null(pc.list_value_length(values), 0).to_numpy(zero_copy_only=False) if n else np.zeros(0)
        valid = np.asarray(values.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        bad = valid & (lengths != width)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"{self.where}: vector of length {int(lengths[i])} at {_where_row(rows, i)}, expected {width}")
        flat = values.flatten()
        if flat.null_count:
            raise DataError(f"{self.where}: a dense vector has a null element")
        x = flat.to_numpy(zero_copy_only=False).astype(np.float32)
        if not np.isfinite(x).all():
            i = int(np.argmax(~np.isfinite(x))) // width
            tok = int(np.nonzero(valid)[0][i])
            raise DataError(f"{self.where}: non-finite vector element at {_where_row(rows, tok)}")
        out = np.zeros((n, width), dtype=np.float32)
        out[valid] = x.reshape(-1, width)
        return out


@dataclass
class EncodedGroup:
    """The encoded features of one token group (numpy, ``n`` tokens).

    ``sparse``: ``[n_keys, n]`` int64 table rows (key order ``sparse_keys``); ``numeric``: ``[n, n_numeric]``
    float32; ``dense``: ``[n, sum of lengths]`` float32.
    """

    sparse_keys: tuple[str, ...]
    sparse: np.ndarray
    numeric_names: tuple[str, ...]
    numeric: np.ndarray
    dense_names: tuple[str, ...]
    dense: np.ndarray


class GroupEncoder:
    """Encodes every feature of one token group (a sequence kind's fields or a scenario's features).

    Args:
        features: the group's features, in declaration order (which fixes key and column order).
        where: prefix for messages, e.g. ``"scenario 'coupons'"``; each feature adds ``feature 'name'``.
        base_file: the YAML file that declared them.
    """

    def __init__(self, features: Iterable[FeatureSpec], where: str, base_file: str = "<memory>"):
        self.encoders = [
            FeatureEncoder(f, f"{where} feature {f.name!r}", base_file)
            for f in features
            if f.type is not FeatureType.TIMESTAMP
        ]
        self.where = where

    def names(self, output: Output) -> tuple[str, ...]:
        return tuple(e.spec.name for e in self.encoders if e.output is output)

    def encode(self, column: Callable[[str], pa.Array], n: int, rows: np.ndarray | None = None) -> EncodedGroup:
        """Encode ``n`` tokens; ``column(name)`` returns a feature's flat values ``[n]``."""
        out: dict[Output, list[np.ndarray]] = {o: [] for o in Output}
        for enc in self.encoders:
            out[enc.output].append(enc.encode(column(enc.spec.name), rows=rows))
        sparse = np.stack(out[Output.SPARSE]) if out[Output.SPARSE] else np.zeros((0, n), np.int64)
        numeric = np.stack(out[Output.NUMERIC], axis=1) if out[Output.NUMERIC] else np.zeros((n, 0), np.float32)
        dense = np.concatenate(out[Output.DENSE], axis=1) if out[Output.DENSE] else np.zeros((n, 0), np.float32)
        return EncodedGroup(
            self.names(Output.SPARSE), sparse, self.names(Output.NUMERIC), numeric, self.names(Output.DENSE), dense
        )
