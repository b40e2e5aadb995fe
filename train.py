"""Train and test one model: python train.py task=listops attention=cast [overrides...]

Sweeps: python train.py -m attention.num_clusters=8,16,32 seed=0,1,2
The entry point lives in cast/app/cli.py (installed as `cast-train`).
"""

from cast.app.cli import train_main

if __name__ == "__main__":
    train_main()
