"""Test a finished run again from its saved config and best checkpoint.

    python eval.py run_dir=outputs/runs/2026-01-01/12-00-00_listops_cast [split=val]
"""

import hydra
from omegaconf import DictConfig

from cast.run import evaluate


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    out = evaluate(cfg)
    print(f"{out['split']} accuracy {out['acc']:.4f}  ({out['checkpoint']})")
    return out["acc"]


if __name__ == "__main__":
    main()
