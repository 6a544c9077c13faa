"""benchmarks/perf.py's bookkeeping: one docs section and baseline per CPU model, ratios taken within a round."""

import pytest

from benchmarks import perf

INTEL, AMD = "Intel(R) Xeon(R) Processor", "AMD EPYC"


def _run(config: str, step_s: list[float], loss: float = 2.5, rss: float = 100.0) -> perf.LoopRun:
    return perf.LoopRun(config=config, mesh="1x1", batch=2, seq_len=8, tokens_per_step=16, flops_per_token=1e6, num_params=10,
                        step_s=step_s, first_call_s=1.0, compile_s=0.5, time_to_first_step_s=2.0, peak_rss_mib=rss, final_loss=loss)


def test_each_cpu_keeps_its_own_section_and_baseline(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Later section\n")
    perf.write_cpu_section(doc, INTEL, 'intel table\n<!-- perf:baseline {"small@1x1": 100} -->')
    perf.write_cpu_section(doc, AMD, 'amd table\n<!-- perf:baseline {"small@1x1": 300} -->')
    assert perf.read_baseline(INTEL, doc) == {"small@1x1": 100}
    assert perf.read_baseline(AMD, doc) == {"small@1x1": 300}
    # A second run on one CPU replaces its own section only; the other CPU's table stays as it was.
    perf.write_cpu_section(doc, AMD, 'amd again\n<!-- perf:baseline {"small@1x1": 310} -->')
    text = doc.read_text()
    assert "amd table" not in text and "amd again" in text and "intel table" in text
    assert text.count(perf.markers(AMD)[0]) == 1 and text.count(perf.markers(INTEL)[0]) == 1
    assert text.index(perf.markers(INTEL)[1]) < text.index(perf.markers(AMD)[0])  # the new CPU goes after the last one
    assert perf.read_baseline(INTEL, doc) == {"small@1x1": 100}
    assert perf.read_baseline(AMD, doc) == {"small@1x1": 310}


def test_baseline_for_an_unmeasured_cpu_is_a_clear_error(tmp_path):
    doc = tmp_path / "benchmarks.md"
    perf.write_cpu_section(doc, INTEL, '<!-- perf:baseline {"tiny@1x1": 1} -->')
    with pytest.raises(ValueError, match=r"no `perf:baseline` for CPU 'AMD EPYC'.*intel-r-xeon-r-processor.*bench.py --perf"):
        perf.read_baseline(AMD, doc)


def test_duel_ratio_is_within_rounds_and_pooled_rows_keep_every_step():
    # Round 1: jaxbig 16 / 0.1 s = 160 tokens/s against 200; round 2: the host is twice as fast for both, 320 against 400.
    jaxbig = [_run("small", [0.1, 0.1, 0.1]), _run("small", [0.05, 0.05, 0.05], rss=120.0)]
    duel = perf.Duel(config="small", jaxbig=jaxbig, torch=[{"tokens_per_s": 200.0}, {"tokens_per_s": 400.0}])
    assert duel.ratios() == pytest.approx([0.8, 0.8])
    assert duel.ratio() == pytest.approx(0.8)
    table = "\n".join(perf.duel_table([duel]))
    assert "| small | float32 | 1 (jaxbig) | 160 | 200 | 0.80 |" in table
    assert "| small | float32 | 2 (PyTorch) | 320 | 400 | 0.80 |" in table
    row = perf.pooled(jaxbig)
    assert len(row.step_s) == 6 and row.peak_rss_mib == 120.0
    assert row.tokens_per_s == pytest.approx(16 / 0.075)  # median of the pooled steps


def test_unequal_rounds_are_refused():
    duel = perf.Duel(config="d512 bf16", jaxbig=[_run("d512 bf16", [0.1])], torch=[])
    with pytest.raises(ValueError):
        duel.ratios()
