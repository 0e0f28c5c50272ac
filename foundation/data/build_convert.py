"""Converting raw-log columns to the sample types, vectorised, finding the rows that do not convert.

Every function takes one Arrow array (a Parquet column of any sensible type, or a CSV column read as
strings) and returns ``(values, bad, reason)``: ``values`` of the target type with null where the input is
null or bad, ``bad`` a ``[n]`` bool numpy mask of rows whose value could not be converted (``None`` when
there are none) and ``reason`` the words for a message. A column of a type that cannot hold the value at
all raises :class:`Unsupported` (the caller names the file and column).

Conversion rules (documented for users in ``recfm data build --help`` via the build module):

* **ids** (categoricals, ``user_id``, ``exposure_id``): integers are taken as they are (floats only when
  integral, bools as 0/1); a string holding an integer literal (``"42"``, ``" -7 "``, up to int64) is that
  integer, in CSV and Parquet alike; any other string is hashed to a non-negative int64 with
  :func:`stable_hash`.
* **timestamps**: integer unix seconds (integer strings in CSV), or an Arrow timestamp/date column
  (converted to seconds, rounding toward zero). Anything else in a row is bad.
* **numerics**: float32 from any integer/float column or a float literal string (``1.5``, ``-2e3``,
  ``nan``, ``inf``).
* **dense vectors**: list<float32> from an Arrow list column, or in CSV a string of numbers separated by
  spaces, commas or semicolons, optionally in brackets (``"[0.1 0.2 0.3]"``). A vector whose length is not
  the spec's ``length`` is bad.
* **binary labels**: int8 0/1 (from bools, integers, integral floats, integer strings); other values are
  bad. **Regression labels**: float32.
"""

from __future__ import annotations

from decimal import Decimal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recfm.scenarios.spec import FeatureSpec, FeatureType, LabelSpec, LabelType

_INT_RE = r"^[+-]?[0-9]{1,19}$"
_FLOAT_RE = r"(?i)^[+-]?(([0-9]+(\.[0-9]*)?|\.[0-9]+)(e[+-]?[0-9]+)?|inf|infinity|nan)$"
_MASK63 = np.uint64(0x7FFF_FFFF_FFFF_FFFF)
_I64 = (Decimal(-(2**63)), Decimal(2**63 - 1))

Result = tuple[pa.Array, "np.ndarray | None", str]


class Unsupported(TypeError):
    """A column whose Arrow type cannot be converted to what the spec declares."""


def stable_hash(strings: pa.Array) -> pa.Array:
    """Non-negative int64 hash of each string, the same on every run and machine; null stays null.

    SipHash-2-4 with pandas' fixed default key (``pandas.util.hash_array``), top bit cleared. Each distinct
    string is hashed once (dictionary encoding). ``[n]`` strings -> ``[n]`` int64.
    """
    d = pc.dictionary_encode(strings.cast(pa.string()))
    words = np.asarray(d.dictionary.to_numpy(zero_copy_only=False), dtype=object)
    hashed = (pd.util.hash_array(words, categorize=False) & _MASK63).astype(np.int64)
    return pc.take(pa.array(hashed, pa.int64()), d.indices)


def _np_mask(arr: pa.Array) -> np.ndarray:
    """A boolean Arrow array as numpy, null = False."""
    return np.asarray(arr.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _bad(mask: np.ndarray) -> np.ndarray | None:
    return mask if mask.any() else None


def _decode(arr: pa.Array) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_large_string(arr.type) or pa.types.is_string_view(arr.type):
        arr = arr.cast(pa.string())
    return arr


def _int_literals(strings: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Strings holding an int64 literal -> (int64 with null elsewhere, ``[n]`` mask of those rows)."""
    s = pc.utf8_trim_whitespace(strings)
    is_int = pc.match_substring_regex(s, _INT_RE)
    cand = pc.if_else(is_int, s, pa.scalar(None, pa.string()))
    try:
        return pc.cast(cand, pa.int64()), _np_mask(is_int)
    except pa.ArrowInvalid:  # a 19-digit literal beyond int64
        dec = pc.cast(cand, pa.decimal128(20, 0))
        lo, hi = (pa.scalar(v, pa.decimal128(20, 0)) for v in _I64)
        fits = pc.and_(pc.greater_equal(dec, lo), pc.less_equal(dec, hi))
        cand = pc.if_else(fits, cand, pa.scalar(None, pa.string()))
        return pc.cast(cand, pa.int64()), _np_mask(fits)


def _from_float(arr: pa.Array) -> Result:
    x = pc.if_else(pc.is_nan(arr), pa.scalar(None, arr.type), arr)
    ok = pc.and_(pc.equal(x, pc.floor(x)), pc.less(pc.abs(x), 9.2e18))
    bad = _np_mask(pc.invert(ok))
    return pc.cast(pc.if_else(ok, x, pa.scalar(None, arr.type)), pa.int64()), _bad(bad), "not an integer"


def to_id(arr: pa.Array, hash_strings: bool = True) -> Result:
    """An id column -> int64 (see the module docstring); ``hash_strings=False`` makes non-integer strings bad."""
    arr = _decode(arr)
    t = arr.type
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        if pa.types.is_uint64(t):
            big = _np_mask(pc.greater(arr, pa.scalar(2**63 - 1, pa.uint64())))
            arr = pc.if_else(pa.array(big), pa.scalar(None, t), arr)
            return pc.cast(arr, pa.int64()), _bad(big), "integer beyond int64"
        return pc.cast(arr, pa.int64()), None, ""
    if pa.types.is_floating(t):
        return _from_float(arr)
    if pa.types.is_string(t):
        ints, is_int = _int_literals(arr)
        other = ~is_int & _np_mask(pc.is_valid(arr))
        if not other.any():
            return ints, None, ""
        if not hash_strings:
            return ints, other, "not an integer"
        hashed = stable_hash(pc.if_else(pa.array(other), arr, pa.scalar(None, pa.string())))
        return pc.if_else(pa.array(is_int), ints, hashed), None, ""
    raise Unsupported(f"type {t} cannot hold integer ids")


def to_timestamp(arr: pa.Array) -> Result:
    """A timestamp column -> int64 unix seconds."""
    arr = _decode(arr)
    if pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
        secs = arr.cast(pa.timestamp("s", tz=getattr(arr.type, "tz", None)), safe=False)
        return secs.cast(pa.int64()), None, ""
    if pa.types.is_string(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_integer(arr.type):
        values, bad, _ = to_id(arr, hash_strings=False)
        return values, bad, "not an integer unix timestamp"
    raise Unsupported(f"type {arr.type} cannot hold timestamps")


def to_float(arr: pa.Array, dtype: pa.DataType = pa.float32()) -> Result:
    """A numeric column -> ``dtype`` (float32 or float64)."""
    arr = _decode(arr)
    t = arr.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t):
        if pa.types.is_decimal(t):
            arr = arr.cast(pa.float64())
        return arr.cast(dtype, safe=False), None, ""
    if pa.types.is_string(t):
        s = pc.utf8_trim_whitespace(arr)
        ok = pc.match_substring_regex(s, _FLOAT_RE)
        bad = ~_np_mask(ok) & _np_mask(pc.is_valid(arr))
        values = pc.cast(pc.if_else(ok, s, pa.scalar(None, pa.string())), pa.float64()).cast(dtype, safe=False)
        return values, _bad(bad), "not a number"
    raise Unsupported(f"type {t} cannot hold numbers")


def to_dense(arr: pa.Array, length: int | None) -> Result:
    """A vector column -> list<float32>; rows whose length differs from ``length`` (when given) are bad."""
    arr = _decode(arr)
    t = arr.type
    if pa.types.is_string(t):
        s = pc.replace_substring_regex(pc.utf8_trim_whitespace(arr), r"^\[\s*|\s*\]$", "")
        parts = pc.split_pattern_regex(s, r"[\s,;]+")
        flat = pc.list_flatten(parts)
        values, bad_flat, _ = to_float(flat)
        bad = np.zeros(len(arr), dtype=bool)
        if bad_flat is not None:
            parents = pc.list_parent_indices(parts).to_numpy()
            bad[parents[bad_flat]] = True
        offsets = parts.offsets
        lists = pa.ListArray.from_arrays(offsets, values, mask=pc.is_null(arr))
        reason = "not a list of numbers"
    elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        try:
            lists = arr.cast(pa.list_(pa.float32()), safe=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise Unsupported(f"type {t} cannot hold float vectors") from e
        bad = np.zeros(len(arr), dtype=bool)
        reason = ""
    else:
        raise Unsupported(f"type {t} cannot hold float vectors")
    if length is not None:
        wrong = _np_mask(pc.not_equal(pc.list_value_length(lists), length))
        if wrong.any() and not bad.any():
            reason = f"vector length is not {length}"
        bad |= wrong
    if bad.any():
        lists = pc.if_else(pa.array(bad), pa.scalar(None, lists.type), lists)
    return lists, _bad(bad), reason


def convert_feature(arr: pa.Array, spec: FeatureSpec) -> Result:
    """One feature column -> the Arrow type :func:`recfm.foundation.data.schema.arrow_type` gives it."""
    if spec.type is FeatureType.CATEGORICAL:
        return to_id(arr)
    if spec.type is FeatureType.TIMESTAMP:
        return to_timestamp(arr)
    if spec.type is FeatureType.NUMERIC:
        return to_float(arr)
    return to_dense(arr, spec.length)


def convert_label(arr: pa.Array, spec: LabelSpec) -> Result:
    """A label column -> int8 0/1 (binary) or float32 (regression)."""
    if spec.type is LabelType.REGRESSION:
        return to_float(arr)
    values, bad, reason = to_id(arr, hash_strings=False)
    not01 = _np_mask(pc.and_(pc.not_equal(values, 0), pc.not_equal(values, 1)))
    if not01.any():
        values = pc.if_else(pa.array(not01), pa.scalar(None, pa.int64()), values)
        bad = not01 if bad is None else (bad | not01)
        reason = "binary label is not 0 or 1"
    return values.cast(pa.int8()), bad, reason
