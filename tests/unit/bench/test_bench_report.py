"""`make bench`'s reporting: the ratios, the tables and the README block it writes (no servers here;
`make bench` itself runs both servers)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from bench import run as bench


def test_a_row_is_the_ratio_of_each_servers_median_with_every_pairs_ratio():
    row = bench.Row.of_runs("single-stream generation", [90.0, 80.0, 100.0], [100.0, 100.0, 80.0], unit="tok/s")
    assert (row.ours, row.theirs) == (90.0, 100.0)
    assert row.ratio == pytest.approx(0.9)
    assert row.paired == pytest.approx([0.9, 0.8, 1.25])


@pytest.mark.parametrize(
    ("ours", "theirs", "higher_is_better", "shown"),
    [
        (110.0, 100.0, True, "1.10x |"),
        (90.0, 100.0, True, "0.90x (worse) |"),
        (90.0, 100.0, False, "0.90x |"),  # 10% less time
        (110.0, 100.0, False, "1.10x (worse) |"),
    ],
)
def test_the_table_says_which_way_is_worse(ours, theirs, higher_is_better, shown):
    row = bench.Row.of_runs("m", [ours], [theirs], higher_is_better, "ms")
    line = bench.table([row]).splitlines()[-1]
    assert line.startswith(f"| m (ms) | {ours:.1f} | {theirs:.1f} | {shown}")


def test_the_table_shows_the_spread_over_the_pairs():
    row = bench.Row.of_runs("m", [1.0, 2.0, 3.0], [1.0, 1.0, 1.0], unit="x")
    assert bench.table([row]).splitlines()[-1].endswith("| 1.00-3.00x |")
    single = bench.Row("peak RSS", 800.0, 1600.0, False, "MiB")  # one value each: no spread
    assert bench.table([single]).splitlines()[-1] == "| peak RSS (MiB) | 800.0 | 1600.0 | 0.50x |  |"


def test_the_ceiling_table_gives_each_servers_share_and_the_most_possible():
    rows = [
        bench.Row.of_runs("single-stream generation", [88.0], [80.0], unit="tok/s"),
        bench.Row.of_runs("TTFT median, short prompt", [30.0], [30.0], False, "ms"),  # no ceiling: left out
    ]
    out = bench.ceiling_table(rows, {"single-stream generation": 100.0}).splitlines()
    assert len(out) == 3
    assert out[2] == "| single-stream generation | 100.0 | 88.0 (88%) | 80.0 (80%) | 1.25x |"


def test_the_readme_block_is_replaced_between_its_markers_only(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\nold table\n<!-- bench:end -->\noutro\n")
    bench.update_readme("new table")
    bench.update_readme("new table")  # the same run twice: the same file
    assert readme.read_text() == "intro\n<!-- bench:start -->\nnew table\n<!-- bench:end -->\noutro\n"
    readme.write_text("no markers\n")
    bench.update_readme("new table")
    assert readme.read_text() == "no markers\n"


def test_weights_read_per_token_leave_out_the_token_embeddings(tmp_path):
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((64, 16), dtype=np.float32))  # looked up, not read whole
    w.add_tensor("blk.0.attn_q.weight", np.zeros((16, 16), dtype=np.float32))
    w.add_tensor("output.weight", np.zeros((64, 16), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert bench.weights_read_per_token(path) == (16 * 16 + 64 * 16) * 4
