"""Train and test one model: python train.py task=listops attention=cast [overrides...]

Sweeps: python train.py -m attention.num_clusters=8,16,32 seed=0,1,2
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cast.run import train
from cast.summary import print_summary


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        results = train(cfg)
    except Exception as error:
        # In a sweep one failed job must not stop the others; its results.json says why it failed.
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            print(f"job failed: {type(error).__name__}: {error}")
            return None
        raise
    print_summary(results)
    return results.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
