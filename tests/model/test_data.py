"""Frame -> tensor encoding (EmbeddingBag format, validation)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from sum_models.data import encode_examples, encode_user_rows, encode_users, fill_missing_user_features


def test_encode_examples_shapes_and_types(spec, make_examples):
    df = make_examples(37, seed=1)
    users, ad_sparse, ad_dense, labels = encode_examples(df, spec)
    assert len(users) == 37
    assert users.dense.dtype == torch.float32 and users.dense.shape == (37, 3)
    assert len(users.sparse_ids) == len(users.sparse_offsets) == 2
    for (name, hash_size), ids, offsets in zip(spec.user_sparse.items(), users.sparse_ids, users.sparse_offsets):
        assert ids.dtype == offsets.dtype == torch.int64
        assert offsets.shape == (37,)
        assert ids.numel() == sum(len(v) for v in df[name])
        assert int(ids.min()) >= 0 and int(ids.max()) < hash_size
    assert ad_sparse.dtype == torch.int64 and ad_sparse.shape == (37, 2)
    assert ad_dense.dtype == torch.float32 and ad_dense.shape == (37, 1)
    assert labels.dtype == torch.float32 and labels.shape == (37, 2)
    np.testing.assert_array_equal(labels[:, 0].numpy(), df["click"].to_numpy())


def test_sparse_lists_modulo_empty_and_missing(spec):
    df = pd.DataFrame(
        {
            "d0": [0.0, 1.0, 2.0],
            "d1": [0.0, 0.0, 0.0],
            "d2": [1.0, 1.0, 1.0],
            "pages": [np.array([1, 51, -1]), [], None],
            "topics": [[], [13], np.array([], dtype=np.int64)],
        }
    )
    users = encode_users(df, spec)
    assert users.sparse_ids[0].tolist() == [1, 1, 49]  # modulo 50, negative ids too
    assert users.sparse_offsets[0].tolist() == [0, 3, 3]
    assert users.sparse_ids[1].tolist() == [1]
    assert users.sparse_offsets[1].tolist() == [0, 0, 1]


def test_arrow_backed_list_column(spec, make_users):
    df = make_users(5, seed=0)
    expected = encode_users(df, spec)
    df["pages"] = pd.Series(list(df["pages"].map(list)), dtype=pd.ArrowDtype(pa.list_(pa.int64())))
    got = encode_users(df, spec)
    assert torch.equal(got.sparse_ids[0], expected.sparse_ids[0])
    assert torch.equal(got.sparse_offsets[0], expected.sparse_offsets[0])


def test_select_matches_encoding_the_subset(spec, make_users):
    df = make_users(40, seed=2)
    idx = torch.tensor([5, 0, 39, 5, 17])
    got = encode_users(df, spec).select(idx)
    want = encode_users(df.iloc[idx.numpy()], spec)
    assert torch.equal(got.dense, want.dense)
    for a, b in zip(got.sparse_ids + got.sparse_offsets, want.sparse_ids + want.sparse_offsets):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_dense_names_the_column(spec, bad, make_users):
    df = make_users(4, seed=0)
    df.loc[2, "d1"] = bad
    with pytest.raises(ValueError, match="'d1'"):
        encode_users(df, spec)


def test_missing_column_and_bad_ad_ids(spec, make_examples):
    df = make_examples(8, seed=0)
    with pytest.raises(ValueError, match="topics"):
        encode_users(df.drop(columns=["topics"]), spec)
    df.loc[3, "ad_category"] = 4  # cardinality 4
    with pytest.raises(ValueError, match="ad_category"):
        encode_examples(df, spec)


def test_fill_missing_user_features_fills_only_the_gaps(spec):
    df = pd.DataFrame(
        {
            "d0": [0.5, np.nan, 2.0],
            "d1": [1.0, 1.0, 1.0],
            "d2": [np.nan, np.nan, 3.0],
            "pages": [np.array([1, 2]), None, [7]],
            "topics": [[3], [4], [5]],
        }
    )
    filled = fill_missing_user_features(df, spec)
    assert filled == {"d0": 1, "d2": 2, "pages": 1}
    assert df["d0"].tolist() == [0.5, 0.0, 2.0] and df["d2"].tolist() == [0.0, 0.0, 3.0]
    assert [list(v) for v in df["pages"]] == [[1, 2], [], [7]]
    users = encode_users(df, spec)  # encodable now: no NaN, the filled list is an empty bag
    assert users.sparse_offsets[0].tolist() == [0, 2, 2]
    assert fill_missing_user_features(df, spec) == {}


def test_encode_user_rows_matches_the_filled_frame(spec, make_users):
    """Serving encodes store rows without a frame: the tensors training's frame path gives, gaps filled alike."""
    df = make_users(12, seed=3)
    rows = [{c: df.at[i, c] for c in (*spec.user_dense, *spec.user_sparse)} for i in range(len(df))]
    rows[4]["d2"], rows[7]["pages"], rows[9]["topics"] = None, None, np.array([], dtype=np.int64)
    frame = df.copy()
    frame.loc[4, "d2"] = np.nan
    frame["pages"] = [None if i == 7 else v for i, v in enumerate(frame["pages"])]
    frame["topics"] = [np.array([], dtype=np.int64) if i == 9 else v for i, v in enumerate(frame["topics"])]
    fill_missing_user_features(frame, spec)
    got, want = encode_user_rows(rows, spec), encode_users(frame, spec)
    assert got.dense[4, 2] == 0.0 and got.sparse_offsets[0][8] == got.sparse_offsets[0][7]  # filled: 0.0, empty bag
    assert torch.equal(got.dense, want.dense)
    for a, b in zip(got.sparse_ids + got.sparse_offsets, want.sparse_ids + want.sparse_offsets):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_encode_user_rows_rejects_what_the_frame_path_rejects(spec, make_users):
    df = make_users(3, seed=0)
    rows = [{c: df.at[i, c] for c in (*spec.user_dense, *spec.user_sparse)} for i in range(len(df))]
    with pytest.raises(ValueError, match="'d1'"):
        encode_user_rows([*rows[:2], {**rows[2], "d1": np.inf}], spec)
    with pytest.raises(ValueError, match="'topics'"):
        encode_user_rows([{k: v for k, v in rows[0].items() if k != "topics"}], spec)
    with pytest.raises(ValueError, match="'pages'"):
        encode_user_rows([{**rows[0], "pages": ["a"]}], spec)
    assert len(encode_user_rows([], spec)) == 0
