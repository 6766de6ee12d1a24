"""A run's lifecycle, the code that decides whether a row is lost or duplicated, in one place.

    prepare ─▶ claim ─────────────▶ stage ──────────────────────▶ commit ─────────────────────▶ drop staging
               (staging.py:          (shards.py: write_shard,      (commit.py: RunCommit,
                StagedRun, claim     embeddings part last;          embed steps, each skipped only
                by conditional       prune_torn_shards and the      when the table holds the same
                write; lease.py:     plan re-check on resume)       content under its transaction)
                the heartbeat)

- `staging`: what a staged run is (`RunState`: absent, foreign, live, dead, committed), decided only by
  `StagedRun.read`; claiming a dead or new run's staging by a write that only one process can win.
- `lease`: the claim kept fresh by a heartbeat from the claim until the commit is done.
- `shards`: the two halves of "embeddings part last": `write_shard` and `prune_torn_shards`.
- `commit`: `RunCommit` and the embed-specific commit steps over the generic `TableStore`.

The submodules are imported by their own names: the runners import `shards` while `commit` imports the runners'
`RunStats`, so this package's `__init__` imports none of them.
"""
