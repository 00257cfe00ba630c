"""``python -m bench``: run the benchmarks (``--help`` lists the counts and switches)."""

from bench.dpo import main

if __name__ == "__main__":
    raise SystemExit(main())
