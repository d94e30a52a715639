"""The benchmark's two training loops run (a few steps), so `make bench` cannot rot unnoticed."""

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import run as bench  # noqa: E402


def test_bench_loops_run(corpus, tokenizer_dir, tmp_path):
    bare = bench.bare_tokens_per_s_in_process(corpus, tokenizer_dir, tmp_path / "cache", "tiny", 32, 4, 4, 1, 0, 1e-3)
    ours = bench.trainrig_tokens_per_s(corpus, tokenizer_dir, tmp_path / "cache", "tiny", 32, 4, 4, 1, 0, 1e-3, tmp_path / "run")
    assert bare > 0 and ours > 0
