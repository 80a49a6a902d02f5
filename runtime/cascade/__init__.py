"""The cascade: bundle parsing, stage building, the stages, breakers, and the Engine the server calls."""
