"""How close `pipeline.py --plan` comes to a real run: its estimate beside the stage times
an experiment recorded (`timings.json`), on the same machine, data and settings.

Run the pipeline first (e.g. `make demo DEMO_OUT=/tmp/demo_out`), then, with the same
config, data and parallelism:

    python -m bench.plan_accuracy --config configs/demo.yaml --data-dir demo_data_seed0 \\
        --out-dir /tmp/demo_out --parallel 2

The plan measures each model (or reads its cached measurement) and this prints, per
stage it estimates, the estimate, the recorded time and their ratio.
"""

from __future__ import annotations

import argparse
import json

import torch

from core.config import load_config, model_config
from core.settings import PredictSettings, layout_of
from models import inference
from workflow import planning
from workflow.stages import model_names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--parallel", type=int, default=1)
    args = p.parse_args()
    cfg = load_config(args.config, [f"data_dir={args.data_dir}", f"out_dir={args.out_dir}"])
    model_cfgs = {n: model_config(cfg, n) for n in model_names(cfg)}
    views = inference.tta_views(PredictSettings.from_config(cfg).tta)
    plan = planning.plan_run(cfg, model_cfgs, views, args.parallel, torch.device("cpu"))
    recorded = json.loads(layout_of(cfg).timings.read_text())
    train = recorded.get("train (parallel)") or sum(
        v for k, v in recorded.items() if k.startswith("train ")
    )
    predicted = sum(v for k, v in recorded.items() if k.startswith("predict"))
    print("\n".join(planning.report(plan)))
    print("stage | plan | recorded | plan / recorded")
    for stage, estimate, real in (
        ("train", plan.train_s, train),
        ("predict", plan.predict_s, predicted),
    ):
        print(f"{stage} | {estimate:.0f} s | {real:.0f} s | {estimate / real:.2f}")


if __name__ == "__main__":
    main()
