"""Arrow schemas of the raw logs and of the user-level samples.

Raw logs (Parquet or CSV; one table or a folder of files each)::

    events      user_id:int64  timestamp:int64  action:string  <sequence field columns>
    exposures   user_id:int64  timestamp:int64  scenario:string  [exposure_id:int64]
                <feature columns of each scenario>  <label columns>  [p_<label>:float64 oracle]

A **sample** is one user over one window (brief section 2), one Parquet row::

    user_id  int64
    window   int64                         start of the window (unix seconds)
    h        list<struct<ts, kind, f1, f2, ...>>   events before the window, time order
    r        list<struct<ts, kind, f1, f2, ...>>   events inside the window, before its last exposure
    t_<s>    list<struct<exposure_id, ts, <features of s>, <labels of s>, [p_<label>]>>
                                           one column per scenario s; exposures of s in the window,
                                           time order; empty list when the user had none in s

``kind`` is the index of the event's sequence in ``WorldSpec.sequences``; event fields a kind does not
declare are null. Categorical values are int64 (string ids are hashed to int64 while building), numerics
float32, dense vectors list<float32>.

Tokens of a sample, in model order: H (time order), R (time order), T (scenario registry order, time order
within a scenario). The *per-exposure* layout is the same schema with exactly one T token per row and the
R events strictly before that exposure, so both layouts feed the same batch code.
"""

from __future__ import annotations

import pyarrow as pa

from recfm.scenarios.spec import FeatureSpec, FeatureType, LabelType, ScenarioSpec, WorldSpec

USER = "user_id"
TIMESTAMP = "timestamp"
ACTION = "action"
SCENARIO = "scenario"
EXPOSURE_ID = "exposure_id"
WINDOW = "window"
H = "h"
R = "r"
TS = "ts"
KIND = "kind"
ORACLE_PREFIX = "p_"


def target_column(scenario: str) -> str:
    """The sample column holding a scenario's exposures."""
    return f"t_{scenario}"


def oracle_column(label: str) -> str:
    return f"{ORACLE_PREFIX}{label}"


def arrow_type(feature: FeatureSpec) -> pa.DataType:
    """Arrow type of a feature's values inside samples."""
    if feature.type is FeatureType.CATEGORICAL or feature.type is FeatureType.TIMESTAMP:
        return pa.int64()
    if feature.type is FeatureType.NUMERIC:
        return pa.float32()
    return pa.list_(pa.float32())


def event_struct(world: WorldSpec) -> pa.StructType:
    fields = [pa.field(TS, pa.int64(), nullable=False), pa.field(KIND, pa.int16(), nullable=False)]
    fields += [pa.field(f.name, arrow_type(f)) for f in world.event_fields()]
    return pa.struct(fields)


def target_struct(scenario: ScenarioSpec, with_oracle: bool = False) -> pa.StructType:
    fields = [pa.field(EXPOSURE_ID, pa.int64(), nullable=False), pa.field(TS, pa.int64(), nullable=False)]
    fields += [pa.field(f.name, arrow_type(f)) for f in scenario.features]
    for label in scenario.labels:
        fields.append(pa.field(label.name, pa.float32() if label.type is LabelType.REGRESSION else pa.int8()))
    if with_oracle:
        fields += [pa.field(oracle_column(label.name), pa.float64()) for label in scenario.labels]
    return pa.struct(fields)


def sample_schema(world: WorldSpec, with_oracle: bool = False) -> pa.Schema:
    events = pa.list_(event_struct(world))
    fields = [pa.field(USER, pa.int64(), nullable=False), pa.field(WINDOW, pa.int64(), nullable=False)]
    fields += [pa.field(H, events), pa.field(R, events)]
    fields += [
        pa.field(target_column(s.name), pa.list_(target_struct(s, with_oracle))) for s in world.scenarios
    ]
    return pa.schema(fields)
