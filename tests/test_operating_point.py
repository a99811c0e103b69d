"""The operating point on CPU: prompt length is an axis with keys of its own, long prompts are refused where
the model cannot hold them, energy is empty with the reason on CPU, the grid's cost prices the tokens, budgets parse,
prompts are cut up to any length, the energy counter bench reads a counter. (An `oom` cell beside finishing ones:
tests/test_measurements.py.)"""
import textwrap

import pytest

from common.untrusted import BadInput
from orchestrator.grid import load_grid
from orchestrator.plan import make_plan
from tasks import latency, unit as U
from tests.conftest import write_grid
from tests.test_measurements import make_unit

GRID = textwrap.dedent("""
    name: op
    models: [{synthetic: opt-125m}]
    precisions: [fp16, nf4]
    generation: {new_tokens: [16], batch_sizes: [1, 8], prompt_tokens: [128, 1024]}
    perplexity: false
    report: {memory_budgets: [16GiB, 24GB]}
    cost: {usd_per_gpu_hour: 2.5}
""")


def test_prompt_length_is_an_axis_with_keys_of_its_own(tmp_path):
    plan = make_plan(load_grid(write_grid(tmp_path / "g.yaml", GRID)), "r")
    cells = [c for u in plan.units for c in u.cells]
    assert len(cells) == 2 * 2 * 2 and len({c.key for c in cells}) == 8
    assert sorted({c.prompt_tokens for c in cells}) == [128, 1024]
    one = make_plan(load_grid(write_grid(tmp_path / "h.yaml", GRID.replace("prompt_tokens: [128, 1024]",
                                                                           "prompt_tokens: 128"))), "r")
    assert {c.key for u in one.units for c in u.cells} == {c.key for c in cells if c.prompt_tokens == 128}
    grid = load_grid(tmp_path / "g.yaml")
    assert grid.report.memory_budgets == [16 * 2 ** 30, 24 * 10 ** 9] and grid.cost.usd_per_gpu_hour == 2.5
    assert plan.usd_per_gpu_hour == 2.5 and plan.units[0].to_task(plan).usd_per_gpu_hour == 2.5


def test_a_prompt_the_model_cannot_hold_is_refused(tmp_path):
    g = write_grid(tmp_path / "g.yaml", GRID.replace("[128, 1024]", "[128, 2048]"))
    with pytest.raises(BadInput, match="2064 positions; opt-125m holds 2048"):
        from orchestrator.checks import check_models

        check_models(load_grid(g))


def test_energy_is_empty_with_the_reason_on_cpu_and_prompts_are_measured_at_their_length():
    rows = list(U.run_unit(make_unit(cells=((4, 2),), prompt_tokens=24)))
    r = rows[0]
    assert r["status"] == "ok" and r["prompt_tokens"] == 24
    assert r["energy_missing"] == "no energy counter on CPU (NVML's counter is an NVIDIA GPU's)"
    assert r.get("energy_j_per_decode_token") is None and r.get("usd_per_million_tokens") is None
    assert r["prefill_tokens_per_s"] == pytest.approx(2 * 24 * 1e3 / r["ttft_ms"])
    assert r["kv_cache_bytes"] == 2 * 2 * 2 * 16 * (24 + 4 - 1) * 2 * r["kv_bytes_per_element"]
    assert r["warmup_s"] > 0 and r["timed_s"] > 0 and r["memory_measured_in"] == "the last warm-up run"


def test_prompts_are_cut_from_real_text_up_to_any_length():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(set(latency.PROMPT_TEXT.split()) | {"<unk>"})},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    ids = latency.prompt_ids(fast, 1000, 4096, 2, "cpu")
    assert ids.shape == (2, 4096) and ids.tolist() == latency.prompt_ids(fast, 1000, 4096, 2, "cpu").tolist()
    assert ids[0, 11:22].tolist() == ids[1, :11].tolist()  # row b starts 11 tokens further on
    random_ids = latency.prompt_ids(None, 1000, 4096, 2, "cpu")
    assert random_ids.shape == (2, 4096) and int(random_ids.max()) < 1000


def test_energy_windows_span_the_counters_updates_and_carry_its_bound():
    """tasks/energy on a counter that moves every 100 ms (an H200's), read on a clock that a poll moves by
    1 ms: the update interval is 100 ms. Timed runs shorter than the window are followed by untimed runs until it spans
    2 s (none where they were long enough). The columns by hand: 3 timed runs and 1 untimed, 400 J in 2 s; 8
    prefill-only runs of batch 2 x 10 tokens, 4 J in 2 s: 0.025 J a prompt token, (400 - 4 x 0.5) / (4 x 2 x 4) J a
    decode token; at a 200 ms update the bounds are 0.2 s x 2 W / 160 and (0.2 s x 200 W + 0.0025 x 80) / 32."""
    from tasks import energy

    now = [0.0]

    def clock():
        return now[0]

    def read():  # one poll: 1 ms; 10 J at each update, the first at 37 ms
        now[0] += 0.001
        return 10.0 * ((round(now[0] * 1e3) + 63) // 100)

    assert energy.update_interval_ms(read, clock) == pytest.approx(100.0)
    assert energy.update_interval_ms(lambda: 5.0, lambda: (now.__setitem__(0, now[0] + 0.01), now[0])[1]) is None

    def run(seconds):
        def once():
            now[0] += seconds
        return once

    now[0] = 0.9
    assert energy.fill_window(run(0.3), t0=0.0, clock=clock) == 4 and now[0] >= energy.MIN_WINDOW_S
    assert energy.fill_window(run(0.3), t0=now[0] - 2.5, clock=clock) == 0

    c = energy.columns(400.0, 2.0, 4, 3, 4.0, 8, 2.0, batch=2, prompt=10, new_tokens=5, update_ms=200.0)
    assert c["energy_j_per_prefill_token"] == 0.025 and c["energy_j_per_decode_token"] == (400 - 2) / 32
    assert c["energy_j_per_prefill_token_bound"] == pytest.approx(0.2 * 2 / 160)
    assert c["energy_j_per_decode_token_bound"] == pytest.approx((0.2 * 200 + 0.0025 * 80) / 32)
    assert (c["power_mean_w"], c["energy_runs"], c["energy_window_s"]) == (200.0, 4, 2.0)
    assert c["tokens_per_kwh"] == pytest.approx(4 * 2 * 5 / (400 / 3.6e6))
    assert "3 timed runs and 1 untimed one(s) after them (2.00 s)" in c["energy_method"]
    assert "counter update 200 ms" in c["energy_method"]
    still = energy.columns(400.0, 2.0, 3, 3, 4.0, 8, 2.0, batch=2, prompt=10, new_tokens=5, update_ms=None)
    assert "energy_j_per_decode_token_bound" not in still and "untimed" not in still["energy_method"]
