"""The pruner: the math (`lightvla`'s votes, `relevance`'s head), the methods (`methods`, as pluggy
plugins managed by `plugins`) and the prune pipeline (`pipeline`). Nothing here knows OpenPI."""
