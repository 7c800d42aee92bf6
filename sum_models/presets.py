"""Architecture presets and the resolution of the ``model`` section of params.yaml (torch-free).

A *resolved architecture* is a plain JSON dict that fixes every layer of the SUM model (paper §3): it is
what :class:`sum_models.model.SUMModel` is built from and what a snapshot's ``config.json`` stores, so a
snapshot never depends on the presets in force when it is loaded.

The built-in presets (:data:`BUILTIN_PRESETS`) are defined here and only here. The ``model`` section
names a preset (``preset: compact``) and may define or override presets
(``presets: {name: {user_tower: [...], mix_tower: {...}}}``); presets given in params.yaml replace the
built-in preset of the same name. A user-tower layer is one Interaction Module (eq. 1)::

    {"residual_tokens": 4,                       # R: tokens of the residual branch (a linear compression)
     "extractors": [                             # parallel feature extractors, concatenated
        {"type": "mlp", "tokens": 4, "hidden": [256]},
        {"type": "dot_compression", "tokens": 4, "compressed_tokens": 4, "hidden": [64], "dense_width": 0},
        {"type": "dcn", "tokens": 4, "num_layers": 2, "rank": 32},          # rank 0 = full rank
        {"type": "mixer", "tokens": 4, "token_hidden": 32, "channel_hidden": 192}]}

Unset numbers default from ``hidden_dim`` / ``embedding_dim`` (see :data:`EXTRACTOR_DEFAULTS`). The mix
tower is ``{"layers": L, "tokens": T, "interactions": ["dot", "mlp"], "hidden": [H]}`` (DHEN layers).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

__all__ = [
    "BUILTIN_PRESETS",
    "DEFAULT_PRESET",
    "EXTRACTOR_TYPES",
    "MIX_INTERACTIONS",
    "ARCH_KEYS",
    "FORMAT_KEYS",
    "OUTPUT_NORMS",
    "resolve_architecture",
    "available_presets",
    "config_dict",
]

DEFAULT_PRESET = "compact"
EXTRACTOR_TYPES = ("mlp", "dot_compression", "dcn", "mixer")
MIX_INTERACTIONS = ("dot", "mlp", "dcn")
POOLING_MODES = ("mean", "sum", "max")

#: Keys of a resolved architecture that determine the weights or the tower's function (compared by export).
ARCH_KEYS = ("num_embeddings", "embedding_dim", "sparse_pooling", "dense_tokens", "user_tower", "mix_tower",
             "output_norm", "output_scale")
#: Plain keys of the ``model`` section (besides ``preset`` / ``presets``).
FORMAT_KEYS = ("num_embeddings", "embedding_dim", "sparse_pooling", "dense_tokens", "hidden_dim", "mix_hidden_dim",
               "output_norm", "output_scale")
#: ``output_norm`` values: the bound on the tower's output scale (sum_models/output_bound.py).
OUTPUT_NORMS = ("none", "layernorm", "l2")

_TOP_DEFAULTS: dict[str, Any] = {
    "num_embeddings": 2,
    "embedding_dim": 96,
    "sparse_pooling": "mean",
    "dense_tokens": 0,
    "hidden_dim": 128,
    "mix_hidden_dim": 128,
    # A snapshot exported before the output bound existed has no such keys: it loads unbounded, as trained.
    "output_norm": "none",
    "output_scale": 1.0,
}

# "H" = hidden_dim, "D" = embedding_dim, fractions of them written as ("H", 1/4).
EXTRACTOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"tokens": 4, "hidden": [("H", 1.0)]},
    "dot_compression": {"tokens": 4, "compressed_tokens": 4, "hidden": [("H", 0.25)], "dense_width": 0},
    "dcn": {"tokens": 4, "num_layers": 2, "rank": 32},
    "mixer": {"tokens": 4, "token_hidden": 32, "channel_hidden": ("D", 2.0)},
}

#: Built-in presets. ``compact`` is the daily default (~0.7M FLOPs per user: a simulated day trains in a
#: few seconds on one thread, and it generalised best of the variants measured, see the issue note);
#: ``large`` (~48M FLOPs per user) is dominated by large matrix products (the MFU benchmark's preset);
#: ``paper`` mirrors the production FB CTR tower of §6.1.3: four Interaction Modules with MLP, Dot
#: Compression with Attention and MLP-Mixer extractors (~334M FLOPs per user at the paper's 600 sparse +
#: 1,000 dense features, vs the paper's 390M).
BUILTIN_PRESETS: dict[str, dict[str, Any]] = {
    "compact": {
        "user_tower": [
            {
                "residual_tokens": 2,
                "extractors": [
                    {"type": "mlp", "tokens": 2},
                    {"type": "dot_compression", "tokens": 2, "compressed_tokens": 1, "dense_width": 32},
                ],
            },
            {
                "residual_tokens": 2,
                "extractors": [{"type": "mlp", "tokens": 2, "hidden": [64]}],
            },
        ],
        "mix_tower": {"layers": 1, "tokens": 4, "interactions": ["dot", "mlp"]},
    },
    "large": {
        "user_tower": [
            {
                "residual_tokens": 8,
                "extractors": [
                    {"type": "mlp", "tokens": 16, "hidden": [2048, 1024]},
                    {"type": "dot_compression", "tokens": 8, "compressed_tokens": 16, "hidden": [512]},
                    {"type": "dcn", "tokens": 8, "num_layers": 2, "rank": 256},
                ],
            },
            {
                "residual_tokens": 4,
                "extractors": [
                    {"type": "mlp", "tokens": 8, "hidden": [1024]},
                    {"type": "mixer", "tokens": 8, "token_hidden": 64, "channel_hidden": 384},
                ],
            },
            {
                "residual_tokens": 2,
                "extractors": [{"type": "mlp", "tokens": 4, "hidden": [512]}],
            },
        ],
        "mix_tower": {"layers": 2, "tokens": 8, "interactions": ["dot", "mlp", "dcn"], "hidden": [512]},
    },
    "paper": {
        "user_tower": [
            {
                "residual_tokens": 16,
                "extractors": [
                    {"type": "mlp", "tokens": 16, "hidden": [1024]},
                    {"type": "dot_compression", "tokens": 16, "compressed_tokens": 32, "hidden": [256]},
                    {"type": "mixer", "tokens": 16, "token_hidden": 64, "channel_hidden": 192},
                ],
            },
            {
                "residual_tokens": 8,
                "extractors": [
                    {"type": "mlp", "tokens": 8, "hidden": [512]},
                    {"type": "dot_compression", "tokens": 8, "compressed_tokens": 16, "hidden": [128]},
                    {"type": "mixer", "tokens": 8, "token_hidden": 32, "channel_hidden": 192},
                ],
            },
            {
                "residual_tokens": 4,
                "extractors": [
                    {"type": "mlp", "tokens": 4, "hidden": [256]},
                    {"type": "dot_compression", "tokens": 4, "compressed_tokens": 8, "hidden": [64]},
                    {"type": "mixer", "tokens": 4, "token_hidden": 16, "channel_hidden": 192},
                ],
            },
            {
                "residual_tokens": 2,
                "extractors": [
                    {"type": "mlp", "tokens": 2, "hidden": [256]},
                    {"type": "dot_compression", "tokens": 2, "compressed_tokens": 4, "hidden": [64]},
                    {"type": "mixer", "tokens": 2, "token_hidden": 16, "channel_hidden": 192},
                ],
            },
        ],
        "mix_tower": {"layers": 2, "tokens": 8, "interactions": ["dot", "mlp", "dcn"], "hidden": [256]},
    },
}


def config_dict(cfg: Any, what: str) -> dict[str, Any]:
    """A config section as a plain dict, whether given as a pydantic model or a mapping.

    Args:
        cfg: ``params.<section>`` (a pydantic model), a mapping, or None (an empty dict: the defaults).
        what: The section's name for the error message (``"model"``, ``"train"``).

    Returns:
        A new dict (JSON values for a pydantic model).

    Raises:
        TypeError: ``cfg`` is neither.
    """
    if cfg is None:
        return {}
    if hasattr(cfg, "model_dump"):
        return cfg.model_dump(mode="json")
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"{what} config must be a mapping or pydantic model, got {type(cfg).__name__}")


def available_presets(presets: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Built-in presets overridden / extended by the ``presets`` of params.yaml."""
    out = copy.deepcopy(BUILTIN_PRESETS)
    for name, body in dict(presets or {}).items():
        out[str(name)] = copy.deepcopy(dict(body))
    return out


def _positive_int(value: Any, what: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{what} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")
    return int(value)


def _default(value: Any, hidden_dim: int, embedding_dim: int) -> Any:
    if isinstance(value, tuple):
        base, frac = value
        return max(1, int(round((hidden_dim if base == "H" else embedding_dim) * frac)))
    if isinstance(value, list):
        return [_default(v, hidden_dim, embedding_dim) for v in value]
    return value


def _resolve_hidden(value: Any, what: str) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} must be a list of layer widths, got {value!r}")
    return [_positive_int(v, f"{what}[{i}]") for i, v in enumerate(value)]


def _resolve_extractor(raw: Any, where: str, hidden_dim: int, embedding_dim: int) -> dict[str, Any]:
    if not isinstance(raw, Mapping) or "type" not in raw:
        raise ValueError(f"{where}: an extractor is a mapping with a 'type', got {raw!r}")
    kind = str(raw["type"])
    if kind not in EXTRACTOR_TYPES:
        raise ValueError(f"{where}: unknown extractor type {kind!r}; expected one of {EXTRACTOR_TYPES}")
    defaults = EXTRACTOR_DEFAULTS[kind]
    unknown = sorted(set(raw) - set(defaults) - {"type"})
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown} for a {kind!r} extractor; known: {sorted(defaults)}")
    out: dict[str, Any] = {"type": kind}
    for key, default in defaults.items():
        value = raw.get(key)
        value = _default(default, hidden_dim, embedding_dim) if value is None else value
        if key == "hidden":
            out[key] = _resolve_hidden(value, f"{where}.{key}")
        else:
            out[key] = _positive_int(value, f"{where}.{key}", allow_zero=key in ("rank", "dense_width"))
    if kind == "dcn" and out["num_layers"] < 1:
        raise ValueError(f"{where}: a dcn extractor needs num_layers >= 1")
    return out


def _resolve_user_tower(layers: Any, hidden_dim: int, embedding_dim: int) -> list[dict[str, Any]]:
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"user_tower must be a non-empty list of Interaction Module layers, got {layers!r}")
    out = []
    for i, layer in enumerate(layers):
        where = f"user_tower[{i}]"
        if not isinstance(layer, Mapping):
            raise ValueError(f"{where} must be a mapping, got {layer!r}")
        unknown = sorted(set(layer) - {"residual_tokens", "extractors"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected residual_tokens, extractors")
        extractors = layer.get("extractors") or []
        if not extractors:
            raise ValueError(f"{where} needs at least one extractor")
        out.append(
            {
                "residual_tokens": _positive_int(layer.get("residual_tokens", 0), f"{where}.residual_tokens", True),
                "extractors": [
                    _resolve_extractor(e, f"{where}.extractors[{j}]", hidden_dim, embedding_dim)
                    for j, e in enumerate(extractors)
                ],
            }
        )
    return out


def _resolve_mix_tower(raw: Any, mix_hidden_dim: int) -> dict[str, Any]:
    raw = dict(raw or {})
    unknown = sorted(set(raw) - {"layers", "tokens", "interactions", "hidden", "dot_only_user_embeddings", "norm"})
    if unknown:
        raise ValueError(f"mix_tower: unknown key(s) {unknown}")
    interactions = list(raw.get("interactions") or ["dot", "mlp"])
    bad = [i for i in interactions if i not in MIX_INTERACTIONS]
    if bad or len(set(interactions)) != len(interactions):
        raise ValueError(f"mix_tower.interactions must be distinct values of {MIX_INTERACTIONS}, got {interactions}")
    norm = str(raw.get("norm", "pre"))
    if norm not in ("pre", "post", "none"):
        raise ValueError(f"mix_tower.norm must be 'pre', 'post' or 'none', got {norm!r}")
    return {
        "layers": _positive_int(raw.get("layers", 1), "mix_tower.layers"),
        "tokens": _positive_int(raw.get("tokens", 4), "mix_tower.tokens"),
        "interactions": interactions,
        "hidden": _resolve_hidden(raw.get("hidden") or [mix_hidden_dim], "mix_tower.hidden"),
        "dot_only_user_embeddings": bool(raw.get("dot_only_user_embeddings", True)),
        "norm": norm,
    }


def resolve_architecture(model_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Turns a ``model`` section (or an already resolved architecture) into a resolved architecture.

    Args:
        model_cfg: ``params.model`` as a dict: the keys of :data:`FORMAT_KEYS` plus ``preset`` and
            ``presets``; or a resolved architecture (it has ``user_tower``), which is re-validated.

    Returns:
        A JSON-serialisable dict with every key of :data:`ARCH_KEYS` plus ``preset``, ``hidden_dim`` and
        ``mix_hidden_dim``; every layer and option explicit.

    Raises:
        ValueError: Unknown preset, extractor type or option; a non-positive size.
    """
    raw = dict(model_cfg or {})
    top = {k: raw.get(k, v) if raw.get(k) is not None else v for k, v in _TOP_DEFAULTS.items()}
    k = _positive_int(top["num_embeddings"], "num_embeddings")
    d = _positive_int(top["embedding_dim"], "embedding_dim")
    hidden_dim = _positive_int(top["hidden_dim"], "hidden_dim")
    mix_hidden_dim = _positive_int(top["mix_hidden_dim"], "mix_hidden_dim")
    pooling = str(top["sparse_pooling"])
    if pooling not in POOLING_MODES:
        raise ValueError(f"sparse_pooling must be one of {POOLING_MODES}, got {pooling!r}")
    output_norm = str(top["output_norm"])
    if output_norm not in OUTPUT_NORMS:
        raise ValueError(f"output_norm must be one of {OUTPUT_NORMS}, got {output_norm!r}")
    output_scale = top["output_scale"]
    if isinstance(output_scale, bool) or not isinstance(output_scale, (int, float)) or not 0 < output_scale < float("inf"):
        raise ValueError(f"output_scale must be a finite number > 0, got {output_scale!r}")
    if "user_tower" in raw and raw["user_tower"] is not None:
        preset_name = str(raw.get("preset") or "custom")
        body = {"user_tower": raw["user_tower"], "mix_tower": raw.get("mix_tower")}
    else:
        preset_name = str(raw.get("preset") or DEFAULT_PRESET)
        presets = available_presets(raw.get("presets"))
        if preset_name not in presets:
            raise ValueError(f"unknown model preset {preset_name!r}; available: {sorted(presets)}")
        body = presets[preset_name]
    return {
        "preset": preset_name,
        "num_embeddings": k,
        "embedding_dim": d,
        "sparse_pooling": pooling,
        "dense_tokens": _positive_int(top["dense_tokens"], "dense_tokens", allow_zero=True),
        "hidden_dim": hidden_dim,
        "mix_hidden_dim": mix_hidden_dim,
        "user_tower": _resolve_user_tower(body.get("user_tower"), hidden_dim, d),
        "mix_tower": _resolve_mix_tower(body.get("mix_tower"), mix_hidden_dim),
        "output_norm": output_norm,
        "output_scale": float(output_scale),
    }
