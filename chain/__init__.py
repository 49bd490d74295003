"""The submission chain after training: out-of-sample decisions, post-processing and
regions, the region refiner's application, optuna studies, what each artefact was made
from (stamps, lineage), the score tables and the HTML report, and the exported package.
Above `data/` and `models/`; it never imports `training/`.
"""
