"""Training folds: the engine's loop, optimizers and schedules, a fold's recipe identity
and retry policy, experiment tracking. Above `data/` and `models/`; the commands
`train.py` and `hpo.py` (and the plan) drive it.
"""
