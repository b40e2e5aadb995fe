"""Test a finished run again from its saved config and best checkpoint.

    python eval.py run_dir=outputs/runs/2026-01-01/12-00-00_listops_cast [split=val]

The entry point lives in cast/app/cli.py (installed as `cast-eval`).
"""

from cast.app.cli import eval_main

if __name__ == "__main__":
    eval_main()
