"""Input specification of the SUM model, derived from the feature definitions (never hand-written)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class FeatureSpec:
    """Names and sizes of every model input.

    Attributes:
        user_dense: Dense user features (one float each), in order.
        user_sparse: Sparse user id-list features -> hash size (ids are taken modulo it), in order.
        ad_dense: Dense ad-side features (mix tower only).
        ad_sparse: Single-valued ad-side categorical features -> cardinality (mix tower only).
        labels: Task label columns, in head order (e.g. click, conversion).
    """

    user_dense: tuple[str, ...]
    user_sparse: dict[str, int]
    ad_dense: tuple[str, ...] = ()
    ad_sparse: dict[str, int] = field(default_factory=dict)
    labels: tuple[str, ...] = ("click", "conversion")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "FeatureSpec":
        return cls(
            user_dense=tuple(raw["user_dense"]),
            user_sparse=dict(raw["user_sparse"]),
            ad_dense=tuple(raw.get("ad_dense", ())),
            ad_sparse=dict(raw.get("ad_sparse", {})),
            labels=tuple(raw.get("labels", ("click", "conversion"))),
        )
