"""``python -m bench``: run the DPO benchmark (``--help`` lists the counts and switches)."""

from bench.dpo import main

if __name__ == "__main__":
    raise SystemExit(main())
