"""Progress: a live rich display on a terminal (cells done / failed / running, the unit on each GPU, elapsed and
ETA), plain log lines otherwise; a summary table at the end. Labels, paths and messages come from the user or from
exceptions: they are printed as plain text (control characters escaped), never read as rich markup."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from common.untrusted import plain


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, total: int, live: bool | None = None, console: Console | None = None):
        self.console = console or Console(stderr=False, width=None if sys.stdout.isatty() else 120)
        self.live_mode = sys.stdout.isatty() if live is None else live
        self.total = total
        self.done = self.failed = self.skipped = 0
        self.running: dict[str, str] = {}  # unit label -> where (host / GPU)
        self.t0 = time.monotonic()
        self._live: Live | None = None

    def __enter__(self):
        if self.live_mode:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc):
        if self._live:
            self._live.update(self._render())
            self._live.__exit__(*exc)

    def eta(self) -> float | None:
        finished = self.done + self.failed + self.skipped
        if not finished:
            return None
        return (time.monotonic() - self.t0) / finished * (self.total - finished)

    def _render(self) -> Table:
        t = Table.grid(padding=(0, 2))
        elapsed = time.monotonic() - self.t0
        t.add_row(f"[bold]cells[/] {self.done + self.failed + self.skipped}/{self.total}",
                  f"[green]ok {self.done}[/]", f"[red]failed {self.failed}[/]", f"skipped {self.skipped}",
                  f"running {len(self.running)} unit(s)", f"elapsed {_fmt_s(elapsed)}", f"ETA {_fmt_s(self.eta())}")
        for unit, where in sorted(self.running.items(), key=lambda kv: kv[1]):
            t.add_row(Text(f"  {plain(where)}"), Text(plain(unit)), "", "", "", "", "")
        return t

    def _refresh(self):
        if self._live:
            self._live.update(self._render())

    def log(self, msg: str) -> None:
        msg = plain(msg)
        if self._live:
            self._live.console.print(msg, markup=False, highlight=False)
        else:
            print(msg, flush=True)

    def unit_started(self, unit: str, where: str) -> None:
        self.running[unit] = where
        if not self._live:
            self.log(f"start  {unit} on {where}")
        self._refresh()

    def unit_ended(self, unit: str) -> None:
        self.running.pop(unit, None)
        self._refresh()

    def cell(self, row: dict) -> None:
        status = row.get("status")
        if status == "ok":
            self.done += 1
        elif status == "skipped":
            self.skipped += 1
        else:
            self.failed += 1
        n = self.done + self.failed + self.skipped
        what = f"{row.get('model')} × {row.get('precision')} new_tokens={row.get('new_tokens')} " \
               f"batch={row.get('batch_size')}"
        if status == "ok":
            ppl = row.get("perplexity")
            detail = f"ttft {row['ttft_ms']:.1f} ms, decode {row['decode_ms_per_token']:.2f} ms/token" + \
                     (f", ppl {ppl:.2f}" if ppl else "")
        else:
            detail = f"{row.get('error_type')}: {str(row.get('error_message'))[:160]}"
        self.log(f"[{n}/{self.total}] {status:7s} {what}: {detail} (elapsed {_fmt_s(time.monotonic() - self.t0)}, "
                 f"ETA {_fmt_s(self.eta())})")
        self._refresh()


def summary_table(rows: list[dict]) -> Table:
    """Per (model, precision): cells ok/failed, perplexity, decode ms/token and weights at the first cell."""
    t = Table(title="sweep summary")
    for col in ("model", "precision", "ok", "failed", "skipped", "perplexity", "decode ms/token (range)", "weights MB"):
        t.add_column(col, justify="right" if col not in ("model", "precision") else "left")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("model"), r.get("precision")), []).append(r)
    for (m, p), rs in groups.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        dec = [r["decode_ms_per_token"] for r in ok if r.get("decode_ms_per_token")]
        ppl = next((r.get("perplexity") for r in rs if r.get("perplexity")), None)
        wb = next((r.get("weights_bytes") for r in rs if r.get("weights_bytes")), None)
        t.add_row(escape(plain(m)), escape(plain(p)), str(len(ok)), str(sum(r.get("status") in ("error", "oom", "timeout") for r in rs)),
                  str(sum(r.get("status") == "skipped" for r in rs)), f"{ppl:.3f}" if ppl else "–",
                  f"{min(dec):.2f}–{max(dec):.2f}" if dec else "–", f"{wb / 1e6:.1f}" if wb else "–")
    return t
