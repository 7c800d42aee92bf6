"""SUM upstream user model: user tower, mix tower, loss, Normalized Entropy, snapshots and shift metrics.

Modules (one concern each; importing this package does not import torch):
    spec        FeatureSpec, the model's input spec (derived from the Feast feature definitions)
    data        frames -> tensors (UserInputs, encode_users, encode_examples)
    user_tower  UserTower = SparseArch + DenseArch + interaction -> [B, K, D] (paper §3.2)
    mix_tower   MixTower: K user embeddings + ad features -> logits [B, T] (paper §3.3)
    model       SUMModel, build_model, SpecMismatchError
    loss        MultiTaskBCELoss (eq. 8)
    metrics     NormalizedEntropy, normalized_entropy (eq. 9)
    train       train_model, TrainStats, evaluate_ne, predict_proba, ne_accumulator
    shift       shift_metrics, average_pool (paper §5.2, Table 3)
    snapshot    export_snapshot, load_user_tower, load_model, embed_users, SnapshotError
"""
