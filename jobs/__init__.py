"""The command-line jobs (`python jobs/merge.py --help`), importable as `jobs.<name>` (installed with dmm_ray)."""
