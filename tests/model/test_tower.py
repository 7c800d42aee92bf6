"""The user tower and mix tower as configured by presets: shapes, gradients, golden outputs, FLOPs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from sum_models.data import encode_examples, encode_users
from sum_models.flops import model_flops, parameter_counts, user_tower_flops
from sum_models.mix_tower import DHENLayer
from sum_models.model import build_model
from sum_models.presets import BUILTIN_PRESETS, FORMAT_KEYS, resolve_architecture
from sum_models.user_tower import DenseArch, UserTower

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _embed(tower, users_df, spec):
    u = encode_users(users_df, spec)
    return tower(u.dense, u.sparse_ids, u.sparse_offsets)


@pytest.mark.parametrize("preset", sorted(BUILTIN_PRESETS))
def test_every_preset_builds_and_outputs_k_by_d(preset, spec, make_examples):
    model = build_model(spec, {"preset": preset, "embedding_dim": 8}, seed=0)
    df = make_examples(5, seed=0)
    users, ad_sparse, ad_dense, _ = encode_examples(df, spec)
    emb = model.user_tower(users.dense, users.sparse_ids, users.sparse_offsets)
    assert emb.shape == (5, 2, 8)
    logits = model(users.dense, users.sparse_ids, users.sparse_offsets, ad_sparse, ad_dense)
    assert logits.shape == (5, len(spec.labels))
    assert model.config["preset"] == preset


def test_paper_preset_mirrors_the_production_tower():
    arch = resolve_architecture({"preset": "paper"})
    assert len(arch["user_tower"]) == 4  # four stacked Interaction Modules (§6.1.3)
    for layer in arch["user_tower"]:
        assert {e["type"] for e in layer["extractors"]} == {"mlp", "dot_compression", "mixer"}
    assert arch["num_embeddings"] == 2 and arch["embedding_dim"] == 96  # K=2, D=96 (§5.3)


def test_project_params_resolve_to_the_builtin_compact():
    # params.yaml names a built-in preset and copies no preset body: the daily run's architecture is
    # exactly sum_models.presets' compact with the format keys of params.yaml.
    from sum_platform.config import load_params

    model = load_params(PROJECT_ROOT / "params.yaml").model
    assert model.preset == "compact" and model.presets == {}
    arch = resolve_architecture(model.model_dump(mode="json"))
    assert arch == resolve_architecture({**{k: getattr(model, k) for k in FORMAT_KEYS}, "preset": "compact"})
    assert arch == resolve_architecture({**arch, **BUILTIN_PRESETS["compact"]})


def test_a_preset_defined_in_params_yaml_overrides_the_builtin(tmp_path):
    from sum_platform.config import load_params

    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    # The example preset spelled out in params.yaml's comment is valid as written.
    lines = (PROJECT_ROOT / "params.yaml").read_text().splitlines()
    start = lines.index("  #   presets:")
    block = [ln[len("  # "):] for ln in lines[start:] if ln.startswith("  #   ")]
    example = yaml.safe_load("\n".join(block))["presets"]
    assert example and all(resolve_architecture({"preset": name, "presets": example}) for name in example)

    custom = {"user_tower": [{"residual_tokens": 1, "extractors": [{"type": "dcn", "tokens": 1}]}]}
    raw["model"]["presets"] = {"compact": custom, **example}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    model = load_params(path).model.model_dump(mode="json")
    arch = resolve_architecture(model)
    assert arch["preset"] == "compact"
    assert [[e["type"] for e in layer["extractors"]] for layer in arch["user_tower"]] == [["dcn"]]
    assert arch != resolve_architecture({**model, "presets": {}})
    # The other built-ins stay as they are, and a new name becomes selectable.
    for name in ("large", "paper"):
        assert resolve_architecture({**model, "preset": name}) == resolve_architecture({**model, "preset": name, "presets": {}})
    for name in example:
        assert resolve_architecture({**model, "preset": name})["preset"] == name


def test_resolution_is_idempotent_and_validates():
    arch = resolve_architecture({"preset": "large"})
    assert resolve_architecture(arch) == arch
    with pytest.raises(ValueError, match="unknown model preset"):
        resolve_architecture({"preset": "nope"})
    bad_type = {"user_tower": [{"extractors": [{"type": "transformer"}]}]}
    with pytest.raises(ValueError, match="unknown extractor type"):
        resolve_architecture(bad_type)
    bad_option = {"user_tower": [{"extractors": [{"type": "mlp", "heads": 2}]}]}
    with pytest.raises(ValueError, match="unknown option"):
        resolve_architecture(bad_option)
    with pytest.raises(ValueError, match="tokens"):
        resolve_architecture({"user_tower": [{"extractors": [{"type": "mlp", "tokens": 0}]}]})
    # A preset defined in params.yaml is selectable and replaces a built-in of the same name.
    custom = {"compact": {"user_tower": [{"residual_tokens": 1, "extractors": [{"type": "dcn", "tokens": 1}]}]}}
    arch = resolve_architecture({"preset": "compact", "presets": custom})
    assert [e["type"] for e in arch["user_tower"][0]["extractors"]] == ["dcn"]


def test_model_config_rejects_a_bad_preset_early():
    from pydantic import ValidationError

    from sum_platform.config import ModelConfig

    # ModelConfig has no defaults of its own (params.yaml is the one source); the model room's default
    # preset, used when a model section names none, is compact.
    model = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())["model"]
    assert ModelConfig(**model).preset == "compact" and resolve_architecture({})["preset"] == "compact"
    with pytest.raises(ValidationError, match="unknown model preset"):
        ModelConfig(**{**model, "preset": "huge"})


def test_user_tower_golden_output(spec, model_cfg, make_users, golden):
    model = build_model(spec, model_cfg, seed=0)
    with torch.no_grad():
        golden("compact_tiny_embeddings", _embed(model.user_tower, make_users(3, seed=0), spec))
        df_users = make_users(3, seed=0)
        ad_sparse = torch.tensor([[1, 0], [5, 3], [19, 2]])
        ad_dense = torch.tensor([[0.5], [-1.0], [2.0]])
        u = encode_users(df_users, spec)
        golden("compact_tiny_logits", model(u.dense, u.sparse_ids, u.sparse_offsets, ad_sparse, ad_dense))


POOLINGS = {"mean": lambda rows: rows.mean(0), "sum": lambda rows: rows.sum(0), "max": lambda rows: rows.max(0).values}


@pytest.mark.parametrize("pooling", sorted(POOLINGS))
def test_sparse_pooling_is_configurable(spec, model_cfg, make_users, pooling):
    model = build_model(spec, {**model_cfg, "sparse_pooling": pooling}, seed=0)
    bag = model.user_tower.sparse_arch.bags["pages"]
    assert bag.mode == pooling
    ids = torch.tensor([3, 1, 4, 1])  # one user's id list: the bag pools the rows of its ids as configured
    with torch.no_grad():
        torch.testing.assert_close(bag(ids, torch.tensor([0]))[0], POOLINGS[pooling](bag.weight[ids]))
    assert _embed(model.user_tower, make_users(4, seed=0), spec).shape == (4, 2, 8)


def test_the_pooling_changes_the_embeddings(spec, model_cfg, make_users):
    """The same weights (seed 0) pooled three ways give three different towers' outputs."""
    users = make_users(4, seed=0)
    assert max(len(p) for p in users["pages"]) > 1  # a user with several ids, where the poolings differ
    with torch.no_grad():
        out = {p: _embed(build_model(spec, {**model_cfg, "sparse_pooling": p}, seed=0).user_tower, users, spec)
               for p in POOLINGS}
    for a, b in [("mean", "sum"), ("mean", "max"), ("sum", "max")]:
        assert not torch.allclose(out[a], out[b]), (a, b)


def test_dense_features_become_tokens_of_dim_d(spec):
    arch = DenseArch(spec.user_dense, 8)
    x = torch.randn(5, len(spec.user_dense))
    tokens = arch(x)
    assert tokens.shape == (5, len(spec.user_dense), 8)
    for i, name in enumerate(spec.user_dense):  # token_i = x_i * w_i + b_i, one projection per feature
        f = arch.features[name]
        torch.testing.assert_close(tokens[:, i], x[:, i : i + 1] * f.weight + f.bias)
    grouped = DenseArch(spec.user_dense, 8, num_tokens=2)
    assert grouped(x).shape == (5, 2, 8)


def test_dense_tokens_option_groups_dense_features(spec, model_cfg, make_users):
    model = build_model(spec, {**model_cfg, "dense_tokens": 2}, seed=0)
    assert model.user_tower.pyramid.token_counts[0] == len(spec.user_sparse) + 2
    assert _embed(model.user_tower, make_users(3, seed=0), spec).shape == (3, 2, 8)


def test_mix_tower_sees_user_embeddings_only_through_dot_products(spec, model_cfg):
    model = build_model(spec, model_cfg, seed=0)
    k = model_cfg["num_embeddings"]
    assert model.mix_tower.layers[0].dot_only_tokens == k
    # No user feature reaches the mix tower (paper §3.3): none of its parameters is user-side.
    assert not any("user" in name for name, _ in model.mix_tower.named_parameters())
    # A user embedding moved along a direction orthogonal to every other token keeps all pairwise dot
    # products, hence the layer's output: it sees the user embeddings only through those products.
    torch.manual_seed(0)
    layer = DHENLayer(2 + 3, 8, tokens=2, interactions=["dot", "mlp", "dcn"], hidden=[16], dot_only_tokens=2, norm="none")
    x = torch.zeros(4, 5, 8)
    x[:, :, :5] = torch.randn(4, 5, 5)  # every token lives in the first 5 dimensions
    moved = x.clone()
    moved[:, 0, 6] = 3.0  # user embedding 0 gains a component orthogonal to every other token
    with torch.no_grad():
        torch.testing.assert_close(layer(moved), layer(x))
        moved[:, 3, 6] = 1.0  # an ad token moved the same way breaks it (it is also read directly)
        assert not torch.allclose(layer(moved), layer(x))


@pytest.mark.parametrize("norm", ["pre", "post", "none"])
def test_dhen_layer_shapes_and_norm_options(norm):
    layer = DHENLayer(6, 8, tokens=3, interactions=["dot", "mlp", "dcn"], hidden=[16], dot_only_tokens=2, norm=norm)
    x = torch.randn(4, 6, 8)
    out = layer(x)
    assert out.shape == (4, 9, 8) == (4, layer.num_out_tokens, 8)
    (out * torch.randn_like(out)).sum().backward()  # a random direction: a plain sum has no gradient under post-LN
    for name, param in layer.named_parameters():  # every parameter is trained, with a finite gradient
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    rescaled = 3 * x + 2  # each input token scaled and shifted alike in all its D dimensions
    with torch.no_grad():
        if norm == "pre":  # LayerNorm first: the layer sees each token's shape only, not its scale or offset
            torch.testing.assert_close(layer(rescaled), out.detach(), atol=1e-4, rtol=1e-4)
        else:
            assert not torch.allclose(layer(rescaled), out.detach(), atol=1e-3)
    if norm == "post":  # LayerNorm last (weight 1, bias 0 at init): every output token has mean 0, variance 1
        torch.testing.assert_close(out.mean(-1), torch.zeros(4, 9), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(4, 9), atol=1e-3, rtol=0)


def test_flops_count_a_hand_computed_tower(spec):
    d, h = 8, 16
    arch = {
        "embedding_dim": d,
        "user_tower": [{"residual_tokens": 2, "extractors": [{"type": "mlp", "tokens": 2, "hidden": [h]}]}],
    }
    tower = UserTower(spec, arch)
    n0 = len(spec.user_sparse) + len(spec.user_dense)  # 5 tokens
    n1 = 2 + len(spec.user_dense) + 2  # MLP tokens + dense tokens + residual tokens
    macs = (
        n0 * d * h + h * 2 * d  # MLP extractor: flatten -> h -> 2 tokens
        + 2 * n0 * d  # residual LC: 2 weighted sums of n0 tokens
        + 2 * n1 * d  # output LC to K = 2
    )
    assert user_tower_flops(tower) == 2 * macs


def test_preset_flops_and_parameters_are_ordered(spec):
    flops = {}
    for preset in ("compact", "large", "paper"):
        model = build_model(spec, {"preset": preset}, seed=0)
        counts = model_flops(model)
        assert counts["model"] == counts["user_tower"] + counts["mix_tower"] > 0
        flops[preset] = counts["user_tower"]
        params = parameter_counts(model.user_tower)
        assert params["total"] == params["embedding"] + params["dense"]
    assert flops["compact"] < flops["large"]
    assert flops["compact"] < 5e6 < 2e7 < flops["large"]


def test_every_forward_docstring_states_tensor_shapes():
    import inspect

    import sum_models.baselines
    import sum_models.extractors
    import sum_models.interaction
    import sum_models.layers
    import sum_models.mix_tower
    import sum_models.model
    import sum_models.user_tower

    checked = []
    for module in (sum_models.layers, sum_models.extractors, sum_models.interaction, sum_models.user_tower,
                   sum_models.mix_tower, sum_models.model, sum_models.baselines):
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, torch.nn.Module) and cls.__module__ == module.__name__:
                doc = cls.forward.__doc__ or ""
                assert "Returns:" in doc and "[B" in doc, f"{cls.__module__}.{name}.forward must state its shapes"
                checked.append(name)
    assert len(checked) >= 15, checked


@pytest.mark.parametrize("preset", sorted(BUILTIN_PRESETS))
def test_gradients_reach_every_parameter_of_every_preset(preset, spec, make_examples):
    from sum_models.loss import MultiTaskBCELoss

    model = build_model(spec, {"preset": preset, "embedding_dim": 8}, seed=0)
    users, ad_sparse, ad_dense, labels = encode_examples(make_examples(64, seed=0), spec)
    logits = model(users.dense, users.sparse_ids, users.sparse_offsets, ad_sparse, ad_dense)
    MultiTaskBCELoss(spec.labels, {"click": 1.0, "conversion": 0.5})(logits, labels).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, name
