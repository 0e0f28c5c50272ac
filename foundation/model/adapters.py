"""Scenario adapters: turn each token group's raw features into ``d_model``-wide tokens (brief section 2).

One tokenizer per *group*: one MLP per sequence kind (its H and R tokens) and one MLP per scenario (its T
tokens, "alignment-free": every scenario keeps its own features). A group's input is the concatenation, in
this order, of

* the embeddings of its embedded features (categoricals and bucketised numerics), in spec order;
* its numeric features (``TokenGroup.numeric``, spec order of the non-bucketised numerics);
* its dense vectors (``TokenGroup.dense``, spec order).

``TIMESTAMP`` features are not adapter inputs: time enters the model through ``Batch.timestamps`` (the mask
and the backbone's time bias).

Embedding tables. All tables live in torchrec ``EmbeddingCollection``\\ s; features that name the same
``table`` share its rows, across scenarios and sequence kinds. torchrec requires one embedding dim per
collection, so tables are grouped by dim: one collection per distinct dim (one in the common case). Inside a
collection, the feature names are namespaced per group with :func:`kjt_key`, because the same feature name
(``item_id``) appears in several groups. The batch's group KJTs keep the plain feature names; the embedder
maps them to namespaced keys itself.

Lookups build one stride-1 ``KeyedJaggedTensor`` per collection (each group feature is one "bag" holding the
group's ``n`` ids), with host-side ``length_per_key``: no host-device synchronisation and no fbgemm op.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recfm.errors import ConfigError, DataError, RecfmError
from recfm.foundation.data.batch import Batch, TokenGroup
from recfm.foundation.model.rows import scatter_rows
from recfm.scenarios.registry import embedding_tables
from recfm.scenarios.spec import FeatureSpec, FeatureType, ScenarioSpec, WorldSpec


def kjt_key(group_name: str, feature_name: str) -> str:
    """The feature name of ``feature_name`` of group ``group_name`` inside the embedding collections.

    ``"<group>.<feature>"``, e.g. ``"clicks.item_id"`` or ``"home_feed.item_id"``. Internal to the embedder:
    the batch's per-group KJTs are keyed by plain feature names.
    """
    return f"{group_name}.{feature_name}"


@dataclass(frozen=True)
class GroupLayout:
    """Which of a group's features feed its tokenizer, and how wide its input is.

    Attributes:
        name: the group (sequence kind or scenario) name.
        embedded: features looked up in a table (categoricals, bucketised numerics), spec order.
        numeric: names of plain numeric features (columns of ``TokenGroup.numeric``), spec order.
        dense: dense-vector features (their columns of ``TokenGroup.dense``), spec order.
    """

    name: str
    embedded: tuple[FeatureSpec, ...]
    numeric: tuple[str, ...]
    dense: tuple[FeatureSpec, ...]

    @staticmethod
    def of(name: str, features: Iterable[FeatureSpec]) -> "GroupLayout":
        features = tuple(features)
        return GroupLayout(
            name=name,
            embedded=tuple(f for f in features if f.is_embedded),
            numeric=tuple(f.name for f in features if f.type is FeatureType.NUMERIC and not f.is_embedded),
            dense=tuple(f for f in features if f.type is FeatureType.DENSE),
        )

    @property
    def dense_width(self) -> int:
        return sum(int(f.length or 0) for f in self.dense)

    @property
    def in_dim(self) -> int:
        """Width of the concatenated tokenizer input."""
        return sum(int(f.dim or 0) for f in self.embedded) + len(self.numeric) + self.dense_width


@dataclass(frozen=True)
class TableSpec:
    """One embedding table and the (namespaced) features that read it."""

    name: str
    num_embeddings: int
    dim: int
    features: tuple[str, ...]


def table_specs(world: WorldSpec, layouts: Sequence[GroupLayout]) -> tuple[TableSpec, ...]:
    """The tables the groups read, with their namespaced feature keys, in the world's first-use order.

    Rows and dims come from :func:`recfm.scenarios.registry.embedding_tables` (which raises ConfigError,
    naming file and key, when two users of a table disagree); ``world`` holds the model's scenarios.
    """
    keys: dict[str, list[str]] = {}
    for layout in layouts:
        for f in layout.embedded:
            keys.setdefault(f.table_name, []).append(kjt_key(layout.name, f.name))
    return tuple(
        TableSpec(name, t.num_embeddings, t.dim, tuple(keys[name]))
        for name, t in embedding_tables(world).items()
        if name in keys
    )


def tokenizer_mlp(in_dim: int, d_model: int, hidden: int, dropout: float) -> nn.Module:
    """``in_dim -> d_model``: one Linear when ``hidden == 0``, else Linear-SiLU-Dropout-Linear.

    ``in_dim`` may be 0 (a group with no features): every token is then the learned bias.
    """
    if hidden <= 0:
        return nn.Linear(in_dim, d_model)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, d_model))


class TokenEmbedder(nn.Module):
    """Embeds every token of a :class:`Batch` into ``x: [N, d_model]``.

    Args:
        world: sequence kinds (H/R tokenizers) and, unless ``scenarios`` is given, the scenarios.
        scenarios: the scenarios to build T tokenizers for (default: all of ``world``'s).
        d_model: token width.
        hidden: hidden width of every tokenizer MLP (0: a single Linear).
        dropout: dropout inside the tokenizer MLPs.
        init_std: standard deviation of the normal init of new embedding tables.

    Example::

        emb = TokenEmbedder(world, None, d_model=64, hidden=128)
        x = emb(batch)                     # [batch.num_tokens, 64]
        emb.table("item").weight           # a shared table, one Parameter
    """

    def __init__(
        self,
        world: WorldSpec,
        scenarios: Sequence[ScenarioSpec] | None = None,
        d_model: int = 64,
        *,
        hidden: int = 0,
        dropout: float = 0.0,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.d_model, self.hidden, self.dropout, self.init_std = d_model, hidden, dropout, init_std
        bad = [s.name for s in world.sequences if "." in s.name]
        if bad:
            raise ConfigError([f"{world.source_file}: sequences: name {n!r} may not contain '.'" for n in bad])
        self.world = replace(world, scenarios=())  # the model's scenarios, added below
        self.layouts: dict[str, GroupLayout] = {s.name: GroupLayout.of(s.name, s.fields) for s in world.sequences}
        self.sequence_mlps = nn.ModuleDict(
            {s.name: tokenizer_mlp(self.layouts[s.name].in_dim, d_model, hidden, dropout) for s in world.sequences}
        )
        self.scenario_mlps = nn.ModuleDict()
        self.collections = nn.ModuleDict()
        self.tables: tuple[TableSpec, ...] = ()
        self._add_scenarios(tuple(world.scenarios if scenarios is None else scenarios))

    @property
    def sequence_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.world.sequences)

    @property
    def scenario_names(self) -> tuple[str, ...]:
        return self.world.scenario_names

    # ------------------------------------------------------------------------------------- building

    def add_scenario(self, spec: ScenarioSpec) -> None:
        """Add a scenario's T tokenizer (and any new tables it names); existing parameters are kept.

        Shared tables the scenario reads keep their ``Parameter`` objects (optimizer state stays valid).
        """
        self._add_scenarios((spec,))

    def _add_scenarios(self, specs: Sequence[ScenarioSpec]) -> None:
        problems = []
        for spec in specs:
            if spec.name in self.layouts or sum(s.name == spec.name for s in specs) > 1:
                problems.append(f"{spec.source_file}: name: the model already has a group called {spec.name!r}")
            if "." in spec.name:
                problems.append(f"{spec.source_file}: name: {spec.name!r} may not contain '.'")
        if problems:
            raise ConfigError(problems)
        world = replace(self.world, scenarios=self.world.scenarios + tuple(specs))
        new = [GroupLayout.of(spec.name, spec.features) for spec in specs]
        tables = table_specs(world, [*self.layouts.values(), *new])  # raises before anything changes
        for layout in new:
            self.layouts[layout.name] = layout
            self.scenario_mlps[layout.name] = tokenizer_mlp(layout.in_dim, self.d_model, self.hidden, self.dropout)
        self.world = world
        self._build_collections(tables)

    def _build_collections(self, tables: tuple[TableSpec, ...]) -> None:
        """One EmbeddingCollection per distinct dim; existing table modules are reused, new ones initialised."""
        existing = {name: module for ec in self.collections.values() for name, module in ec.embeddings.items()}
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        collections = nn.ModuleDict()
        for dim in sorted({t.dim for t in tables}):
            configs = [
                EmbeddingConfig(num_embeddings=t.num_embeddings, embedding_dim=t.dim, name=t.name, feature_names=list(t.features))
                for t in tables
                if t.dim == dim
            ]
            # Built on the meta device, then given real tables: old ones are reused, never copied.
            ec = EmbeddingCollection(tables=configs, device=torch.device("meta"))
            for cfg in configs:
                module = existing.get(cfg.name)
                if module is None:
                    module = nn.Embedding(cfg.num_embeddings, cfg.embedding_dim, device=device)
                    nn.init.normal_(module.weight, std=self.init_std)
                ec.embeddings[cfg.name] = module
            collections[f"dim{dim}"] = ec
        self.collections = collections
        self.tables = tables
        self._key_owner = {
            kjt_key(layout.name, f.name): (layout.name, f.name) for layout in self.layouts.values() for f in layout.embedded
        }

    def table(self, name: str) -> nn.Embedding:
        """The embedding module of table ``name`` (shared by every feature that names it)."""
        for ec in self.collections.values():
            if name in ec.embeddings:
                return ec.embeddings[name]
        raise KeyError(f"no embedding table {name!r} (tables: {', '.join(t.name for t in self.tables)})")

    # -------------------------------------------------------------------------------------- forward

    def check_batch(self, batch: Batch) -> None:
        """Raise :class:`RecfmError` naming any scenario or sequence kind the model has no adapter for."""
        unknown = [s for s in batch.targets if s not in self.scenario_mlps]
        if unknown:
            known = ", ".join(self.scenario_names) or "none"
            raise RecfmError(f"batch has target scenario(s) {', '.join(map(repr, unknown))} with no adapter (model has: {known})")
        unknown = [s for s in batch.events if s not in self.sequence_mlps]
        if unknown:
            known = ", ".join(self.sequence_names) or "none"
            raise RecfmError(f"batch has sequence kind(s) {', '.join(map(repr, unknown))} with no adapter (model has: {known})")

    def forward(self, batch: Batch) -> torch.Tensor:
        """Token embeddings ``[N, d_model]``: row ``i`` is the tokenizer output of token ``i``.

        Rows of tokens in no group stay zero.
        """
        self.check_batch(batch)
        groups: list[TokenGroup] = [*batch.events.values(), *batch.targets.values()]
        embedded = self._lookup(groups)
        outputs, rows = [], []
        for g in groups:
            layout = self.layouts[g.name]
            parts = [embedded[kjt_key(g.name, f.name)] for f in layout.embedded]
            parts += [self._checked(g, "numeric", g.numeric, len(layout.numeric), layout.numeric),
                      self._checked(g, "dense", g.dense, layout.dense_width, tuple(f.name for f in layout.dense))]
            mlp = self.scenario_mlps[g.name] if g.name in batch.targets else self.sequence_mlps[g.name]
            outputs.append(mlp(torch.cat(parts, dim=1)))
            rows.append(g.token_index)
        if not outputs:
            return torch.zeros(batch.num_tokens, self.d_model, device=batch.offsets.device)
        return scatter_rows(batch.num_tokens, rows, outputs)

    def _checked(self, g: TokenGroup, what: str, values: torch.Tensor, width: int, names: tuple[str, ...]) -> torch.Tensor:
        """``values`` as ``[n, width]`` float; DataError when the batch disagrees with the spec."""
        given = g.numeric_names if what == "numeric" else g.dense_names
        if given and tuple(given) != names:
            raise DataError(f"group {g.name!r}: {what} columns {list(given)} but the spec gives {list(names)}")
        if values.numel() == 0 and width == 0:
            return values.new_zeros(g.size, 0, dtype=torch.float32)
        if values.dim() != 2 or values.shape[0] != g.size or values.shape[1] != width:
            raise DataError(f"group {g.name!r}: {what} is {tuple(values.shape)}, expected [{g.size}, {width}]")
        return values.float()

    def _lookup(self, groups: Sequence[TokenGroup]) -> dict[str, torch.Tensor]:
        """Embeddings ``[n_g, dim]`` of every group's embedded features, keyed by :func:`kjt_key`.

        Groups absent from the batch contribute empty bags (their scenario had no exposures).
        """
        present = {g.name: g for g in groups}
        device = groups[0].token_index.device if groups else torch.device("cpu")
        out: dict[str, torch.Tensor] = {}
        for ec in self.collections.values():
            keys, values = [], []
            for cfg in ec.embedding_configs():
                for key in cfg.feature_names:
                    group_name, feature = self._key_owner[key]
                    g = present.get(group_name)
                    keys.append(key)
                    values.append(self._ids(g, feature) if g is not None else torch.empty(0, dtype=torch.long, device=device))
            counts = [int(v.numel()) for v in values]  # host ints: shapes, not data
            lengths = torch.cat([torch.full((1,), c, dtype=torch.long, device=device) for c in counts])
            kjt = KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=lengths, stride=1, length_per_key=counts)
            out.update({key: jt.values() for key, jt in ec(kjt).items()})
        return out

    @staticmethod
    def _ids(g: TokenGroup, feature: str) -> torch.Tensor:
        """``[n]`` table rows of ``feature`` in group ``g`` (one id per token, sliced without a sync)."""
        if g.sparse is None or feature not in g.sparse.keys():
            raise DataError(f"group {g.name!r}: the batch has no ids for embedded feature {feature!r}")
        keys = g.sparse.keys()
        n = g.size
        values = g.sparse.values()
        if values.numel() != n * len(keys):
            raise DataError(f"group {g.name!r}: sparse KJT has {values.numel()} values for {n} tokens x {len(keys)} keys (expected one per token and key)")
        i = keys.index(feature)
        return values[i * n : (i + 1) * n].long()
