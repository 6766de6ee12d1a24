"""Probe jobs: shallow classifiers trained on frozen embeddings, their metrics, reports and predictions.

Modules, in the order a probe job uses them: `data` (join embedding arrays with labels, split),
`models` (the linear/MLP network and the saved probe), `train` (one trial: Adam, warm-up then cosine decay, early
stopping), `search` (presets, the grid, trials in parallel processes), `metrics` (scikit-learn and mir_eval
scores), `report` (report.json, Markdown, plots) and `predictions` (rows of the predictions table).
Engine- and storage-free: the job layer reads and writes the tables (`catalog_embed.pipelines.probes.tables`) and runs trials
on Ray (`catalog_embed.pipelines.probes.job`).
"""
