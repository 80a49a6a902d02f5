"""Moved to tools/selftest.py (`python -m tools.selftest`); this name still runs it, with the same flags."""
from tools.selftest import main

if __name__ == "__main__":
    raise SystemExit(main())
