"""Gates of the daily pipeline: the data gate (GX) and the snapshot gate; nothing else.

Modules:
    data_checks  the data gate's entry points validate_partition / validate_day, ValidationReport,
                 DataValidationError
    suites       the GX suites: contract (build_suite) and trailing (build_trailing_suite), column lists,
                 type constants, KINDS
    frames       the frame handed to GX: helper columns ``<column>__<what>`` (batch_frame), content_digest,
                 the users partition's user ids
    profiles     profiles of validated days (the trailing checks' baseline), load_history, trailing_plan
    gx_project   the file-backed GX project: lock, context, checkpoint reuse, build_docs (Data Docs)
    messages     describe_failure: one readable line per failed expectation
    quarantine   moves a failed day's partitions aside (reason.json) and releases them back
    corruptions  catalogue of corrupted partitions the data gate must catch (tests, soak)
    gate         the snapshot gate: a candidate against production (embedding shift, NE); verdict_markdown
"""
