"""Rows as the current code writes them, whatever code wrote them: the one place where rows of older schemas and
measurement versions are upgraded on read (CHANGELOG.md says what each version changed), so that nothing else in the
report knows about versions. And the intervals, recomputed from the raw samples every row keeps, so that every row's
interval follows one rule (common.stats: log scale, none from fewer than MIN_SAMPLES samples).
"""
from __future__ import annotations


import pandas as pd

from common.catalog import DECODE_VERSIONS, MEASUREMENT_VERSION
from common.stats import MIN_SAMPLES, mean_interval, perplexity_interval, relative_halfwidth

# schema 1: no quant_scheme / weight_bits_nominal columns (bitsandbytes and unquantized precisions only)
SCHEMES = {"fp32": ("none", 32), "fp16": ("none", 16), "bf16": ("none", 16), "int8": ("weight+activation", 8),
           "nf4": ("weight-only", 4), "fp4": ("weight-only", 4), "nf4-dq": ("weight-only", 4)}
# before the energy window: every row measured on an H200, whose counter updates every 100 ms
COUNTER_UPDATE_S = 0.1
# what an older measurement version got wrong, by (decode, version): shown beside its rows
NOTES = {
    ("eager", 1): "measured before version 2: its memory peaks count one KV cache twice",
    ("eager", 2): "measured before version 3: decode did not start from an idle GPU, so a host-bound cell's decode "
                  "ms/token may read low (the GPU ran steps queued during the prefill)",
    ("compiled", 1): "measured before compiled version 3: CUDA graphs were recorded again inside the timed runs "
                     "(40-1200 ms a run on an H200): its decode ms/token reads high",
    ("compiled", 2): "measured before compiled version 3: CUDA graphs were recorded again inside the timed runs "
                     "(40-1200 ms a run on an H200): its decode ms/token reads high",
    ("compiled", 3): "measured before compiled version 4: decode did not start from an idle GPU, so a host-bound "
                     "cell's decode ms/token may read low",
}


def col(df: pd.DataFrame, name: str) -> pd.Series:
    """A column, all None where the rows lack it."""
    return df[name] if name in df else pd.Series([None] * len(df), index=df.index, dtype=object)


def _filled(s: pd.Series, value) -> pd.Series:
    """`s` with its gaps filled by `value`; a column no row had comes back from Parquet as all-NaN floats, and text
    is filled into it as text (pandas refuses a string into a float column)."""
    text = isinstance(value, str) or (isinstance(value, pd.Series) and not pd.api.types.is_numeric_dtype(value))
    return (s.astype(object) if text and s.dtype.kind == "f" else s).fillna(value)


def numeric(df: pd.DataFrame, name: str) -> pd.Series:
    """A column as numbers (NaN where missing or not a number; all NaN where the rows lack it)."""
    return pd.to_numeric(col(df, name), errors="coerce")


def upgrade(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of any schema and measurement version as the current code writes them, with `measurement_note` where an
    older version measured them."""
    if not len(df):
        return df
    out = df.copy()
    # axes added after the first rows: their values then
    for name, default in (("engine", "hf"), ("decode", "eager"), ("kv_cache", "native"), ("prompt_tokens", 32)):
        out[name] = _filled(col(out, name), default)
    out["prompt_tokens"] = out["prompt_tokens"].astype(int)
    # what a method quantizes, for rows written before it was recorded; LLM.int8 multiplies in int8 (with fp16
    # outlier columns): its activations are quantized too, whatever an older row said
    name = _filled(col(out, "precision_name"), col(out, "precision"))
    known = name.map(lambda n: SCHEMES.get(n, (None, None)))
    out["quant_scheme"] = _filled(col(out, "quant_scheme"), known.map(lambda s: s[0]))
    out.loc[name == "int8", "quant_scheme"] = "weight+activation"
    out["weight_bits_nominal"] = numeric(out, "weight_bits_nominal").fillna(known.map(lambda s: s[1]))
    out["memory_measured_in"] = _filled(col(out, "memory_measured_in"), "a run after the timed runs")
    out = _energy_bound(out)
    version = numeric(out, "measurement_version")
    current = out["decode"].map(lambda d: DECODE_VERSIONS.get(d, MEASUREMENT_VERSION))
    out["measurement_note"] = [NOTES.get((d, int(v))) if v == v and v < c else None
                               for d, v, c in zip(out["decode"], version, current)]
    return intervals(out)


def _energy_bound(df: pd.DataFrame) -> pd.DataFrame:
    """Rows from before the energy window read NVML around their timed runs alone and recorded no bound: theirs is
    one counter update at each end of the timed runs and of the prefill loop, at their mean power, relative to the
    decode share of that energy: (u / timed_s + u / prefill_s × (1 − share)) / share. Their joules per decode token
    are the timed runs' less the prefills', like the window's."""
    j = numeric(df, "energy_j_per_decode_token")
    before = numeric(df, "energy_window_j").isna() & j.notna() & numeric(df, "energy_j_per_decode_token_bound").isna()
    if not before.any():
        return df
    runs = numeric(df, "repeats_done")
    decode_j = j * runs * numeric(df, "batch_size") * (numeric(df, "new_tokens") - 1)
    share = decode_j / numeric(df, "energy_timed_j").where(numeric(df, "energy_timed_j") > 0)
    u = COUNTER_UPDATE_S
    rel = (u / numeric(df, "timed_s") + u / numeric(df, "energy_prefill_s") * (1 - share)) / share
    out = df.copy()
    out["energy_j_per_decode_token_bound"] = numeric(df, "energy_j_per_decode_token_bound").where(~before, rel * j)
    out["energy_window_j"] = numeric(df, "energy_window_j").where(~before, numeric(df, "energy_timed_j"))
    out["energy_runs"] = numeric(df, "energy_runs").where(~before, runs)
    return out


def _runs(samples, new_tokens) -> list[float]:
    """Each timed run's mean decode gap, from the raw gaps (new_tokens - 1 a run, one run after another)."""
    if samples is None or not isinstance(new_tokens, (int, float)) or new_tokens != new_tokens or new_tokens < 2:
        return []
    try:
        values = [float(s) for s in samples]
    except TypeError:
        return []
    k = int(new_tokens) - 1
    return [sum(values[i:i + k]) / k for i in range(0, len(values) - k + 1, k)]


def intervals(df: pd.DataFrame) -> pd.DataFrame:
    """decode and TTFT intervals over timed runs, perplexity's over windows, recomputed from the samples."""
    out = df.copy()
    runs = [_runs(s, n) for s, n in zip(col(out, "decode_ms_samples"), numeric(out, "new_tokens"))]
    decode = [mean_interval(r) for r in runs]
    out["decode_ms_ci_low"] = [iv[1] if iv else None for iv in decode]
    out["decode_ms_ci_high"] = [iv[2] if iv else None for iv in decode]
    out["decode_ci_rel_halfwidth"] = [relative_halfwidth(r) for r in runs]
    ttft = [mean_interval(list(s)) if s is not None and len(s) else None for s in col(out, "ttft_ms_samples")]
    out["ttft_ms_ci_low"] = [iv[1] if iv else None for iv in ttft]
    out["ttft_ms_ci_high"] = [iv[2] if iv else None for iv in ttft]
    ppl = [perplexity_interval(list(n), list(t)) if n is not None and t is not None and len(n) else None
           for n, t in zip(col(out, "ppl_window_nll"), col(out, "ppl_window_tokens"))]
    has = numeric(out, "perplexity").notna()
    out["ppl_ci_low"] = [iv[1] if iv else None for iv in ppl]
    out["ppl_ci_high"] = [iv[2] if iv else None for iv in ppl]
    few = has & (numeric(out, "ppl_windows").fillna(0) < MIN_SAMPLES)
    for name in ("ln_ppl_ratio_ci_low", "ln_ppl_ratio_ci_high"):
        if name in out:
            out.loc[few, name] = None
    return out
