"""Pipeline results in the parent, progress figures, stage warnings (issue 16 case 8, R69).

Also the leftover of case 2: an upstream stage's unsendable value blames that stage.
"""
import re
import subprocess
import sys

import numpy as np
import pytest

import shmring


def _frames(n=40):
    def src():
        for i in range(n):
            yield np.full((16, 16), i, np.float32)
    return src


def test_results_bring_every_item_back_in_source_order_as_own_copies():
    with shmring.Pipeline("res", capacity=1 << 16) as p:
        small = p.map(lambda a: a[::2, ::2] * 2, p.source(_frames()), workers=3, ordered=True)
        out = list(p.results(small))                 # Pool.imap style: safe to keep (copies)
    assert [int(a[0, 0]) for a in out] == [2 * i for i in range(40)]
    assert all(a.shape == (8, 8) and a.flags.writeable for a in out)
    assert p.summary["stages"]["results"]["items"] == 40


def test_results_zero_copy_items_are_views_and_a_kept_one_is_named_at_the_loop():
    with shmring.Pipeline("res", capacity=1 << 16) as p:
        s = p.map(lambda a: a + 1, p.source(_frames(20)), ordered=True)   # one worker: nothing arrives early
        total = 0
        for v in p.results(s, copy=False):
            assert not v.flags.writeable                 # a read-only view of the ring (early items: copies)
            total += int(v[0, 0])
    assert total == sum(range(1, 21))
    with shmring.Pipeline("res", capacity=1 << 16) as p:
        s = p.map(lambda a: a + 1, p.source(_frames(5)), ordered=True)
        kept = []
        with pytest.warns(shmring.EscapedViewWarning) as rec:
            for v in p.results(s, copy=False):
                kept.append(v)
    assert "results(copy=False)" in str(rec[0].message) and "(16, 16)" in str(rec[0].message)
    assert rec[0].filename == __file__
    assert [int(a[0, 0]) for a in kept] == [1, 2, 3, 4, 5]       # deferred, never overwritten
    del kept, v


def test_a_failing_stage_raises_pipeline_error_from_the_results_loop():
    def bad(a):
        if a[0, 0] == 7:
            raise ValueError("frame seven")
        return a
    with shmring.Pipeline("res", capacity=1 << 16) as p:
        s = p.map(bad, p.source(_frames()), workers=2)
        with pytest.raises(shmring.PipelineError) as e:
            for _ in p.results(s):
                pass
    assert e.value.stage == "map1:bad" and "frame seven" in str(e.value)


def test_leaving_the_results_loop_early_stops_every_stage():
    p = shmring.Pipeline("res", capacity=1 << 16)
    s = p.map(lambda a: a, p.source(_frames(10_000)), workers=2)
    for i, _ in enumerate(p.results(s)):
        if i == 3:
            break
    procs = [pr for st in p._stages for pr in st.procs]
    assert procs and all(pr.exitcode is not None for pr in procs)


def test_results_and_a_sink_or_run_do_not_mix():
    p = shmring.Pipeline("res")
    s = p.source(_frames(1))
    p.results(s)
    with pytest.raises(ValueError, match="results"):
        p.run()
    q = shmring.Pipeline("res")
    t = q.map(lambda a: a, q.source(_frames(1)))
    q.sink(lambda a: None, t)
    with pytest.raises(ValueError):
        q.results(t)


def test_summary_reports_mb_per_s_out_and_the_final_bars_show_the_same_figures(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with shmring.Pipeline("res", capacity=1 << 16) as p:
        s = p.map(lambda a: a * 1, p.source(_frames(200)), workers=2)
        p.sink(lambda a: None, s)
        summary = p.run(progress=True)
    out, err = capsys.readouterr()
    for name, st in summary["stages"].items():
        if name.startswith(("source", "map")):
            assert st["bytes_out"] > 200 * 16 * 16 * 4
            assert st["mb_per_s_out"] == pytest.approx(st["bytes_out"] / summary["elapsed"] / 1e6)
            assert f"{st['mb_per_s_out']:,.1f} MB/s out" in out          # the printed summary
            shown = re.findall(r"([\d,.]+) MB/s out", err.split(name)[-1])
            assert shown and shown[-1] == f"{st['mb_per_s_out']:,.1f}"    # the bar's last redraw


STAGE_KEEPS = """
import numpy as np, shmring
kept = []
def keep(a):
    kept.append(a)                  # a view of the stage's input, kept past the call
    return a.sum()
def src():
    for i in range(5):
        yield np.full((4, 4), i, np.float32)
with shmring.Pipeline("keep", capacity=1 << 16) as p:
    p.sink(lambda v: None, p.map(keep, p.source(src), name="keeper"))
    p.run()
print("done")
"""


def test_a_view_kept_by_a_stage_is_named_by_stage_and_function_not_by_pipeline_internals(tmp_path):
    script = tmp_path / "keeps.py"
    script.write_text(STAGE_KEEPS)
    r = subprocess.run([sys.executable, "-W", "always::shmring.EscapedViewWarning", str(script)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "done" in r.stdout, r.stderr
    assert "stage 'keeper' kept a view of its input array (float32, shape (4, 4))" in r.stderr
    assert f"{script}:4" in r.stderr                             # the stage function's line
    assert "pipeline.py" not in r.stderr and "msg.copy()" not in r.stderr


def test_an_unsendable_value_from_an_upstream_stage_blames_that_stage():
    # case 2 leftover: the stage that yields the value is named, not the one downstream
    def src():
        yield {(1, 2): "tuple keys come back"}
        yield np.ma.masked_array([1, 2], mask=[0, 1])      # refused at send: the mask would be lost
    got = []
    with shmring.Pipeline("res", capacity=1 << 16) as p:
        s = p.map(lambda d: d, p.source(src, name="reader"), name="passthrough")
        with pytest.raises(shmring.PipelineError) as e:
            for v in p.results(s):
                got.append(v)
    assert e.value.stage == "reader" and "UnsupportedType" in str(e.value)
    assert got == [{(1, 2): "tuple keys come back"}]
