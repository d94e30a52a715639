"""The planner, a library without torch: what the machine has (hardware.py), what a run needs per
GPU (memory.py), the cheapest strategy, micro batch and accumulation that fit (search.py), and the
files and command that run the chosen plan (files.py). `launch/plan.py` is its command line and
the planning every entry script does."""
