"""SUM upstream user model (paper §3, §5): user tower, mix tower, loss, NE, snapshots, export and shift.

Modules (one concern each; importing this package does not import torch):
    spec          FeatureSpec, the model's input spec (derived from the Feast feature definitions)
    presets       architecture presets (compact / large / paper) and resolution of params.yaml's ``model``
    data          frames -> tensors (UserInputs, encode_users, encode_examples)
    layers        MLP, LinearCompression (the paper's LC), token_linear
    extractors    Interaction Module extractors: MLPExtractor, DotCompressionAttention (eqs. 2-4),
                  CrossLayer / DCNExtractor (eq. 5), MixerBlock / MLPMixerExtractor (eqs. 6-7)
    interaction   InteractionModule (eq. 1), InteractionPyramid (N_0 tokens -> K embeddings)
    user_tower    UserTower = SparseArch (EmbeddingBags) + DenseArch (dense tokens) + pyramid -> [B, K, D]
    mix_tower     MixTower: DHEN layers over the K user embeddings + ad features -> logits [B, T] (§3.3)
    model         SUMModel, build_model, SpecMismatchError
    loss          MultiTaskBCELoss (eq. 8)
    metrics       NormalizedEntropy, normalized_entropy (eq. 9)
    train         train_model (progress bar, seeded), TrainStats, evaluate_ne, predict_proba, ne_accumulator
    flops         FLOPs per user / example (torch.utils.flop_counter), parameter counts
    baselines     LogisticRegression on the same raw features
    snapshot      export_snapshot (safetensors + config + torch.export program + manifest), load_user_tower,
                  load_model, embed_users
    inference     load_exported_tower: the exported tower without the training code (archive checked first)
    shift         shift_metrics, average_pool (paper §5.2, Table 3)
    atomic        crash-safe replaces of files and folders (fsync, renameat2 exchange), for the snapshot export
                  and sum_platform.files
"""
