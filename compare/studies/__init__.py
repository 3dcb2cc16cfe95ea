"""Study files (spec: TOML -> cells) and their answers (answers: sentences, comparisons, plots)."""
