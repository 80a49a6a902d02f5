"""Image data sets on disk, below the server, the tools and the training code: labeled folders (labeled.py), the
hard-case store and its capture (hardcase_store.py, hardcase_capture.py), crash-safe file writes (durable.py), and
the subnet's scoring of answers against labels (confusion.py). Imports runtime/ at most."""
