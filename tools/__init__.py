"""Command-line tools over a bundle: eval (score a labelled folder), tune (pick exit thresholds)."""
