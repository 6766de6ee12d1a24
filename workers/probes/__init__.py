"""Probe jobs: shallow classifiers trained on frozen embeddings, their metrics, reports and predictions.

Modules, in the order a probe job uses them: `data` (read the embeddings and labels tables, join, split),
`models` (the linear/MLP network and the saved probe), `train` (one trial: Adam, warm-up then cosine decay, early
stopping), `search` (presets, the grid, trials in parallel processes), `metrics` (scikit-learn and mir_eval
scores), `report` (report.json, Markdown, plots) and `predictions` (the predictions table and tagging).
Engine-free: the Ray runner lives in `pipelines.probe`.
"""
