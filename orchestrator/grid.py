"""The grid file: the user-facing contract, validated before anything starts.

Read with yaml.safe_load (nothing in a grid can execute code); every problem becomes one BadInput naming the field
path (`generation.new_tokens[1]`), and the CLI turns it into one message and exit code 2.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ByteSize, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat,
                      PositiveInt, ValidationError, field_validator, model_validator)

from common.untrusted import GRID_CAP, BadInput, expand, read_regular_file
from common.catalog import KV_CACHES, KV_DEFAULTS, KV_GROUPED, kv_label
from common.models import SYNTHETIC_ARCHITECTURES
from common.units import ENGINES, KvSpec, ModelSpec
from tasks.precisions import REGISTRY


class Strict(BaseModel):
    # strict: no coercion (true is not 1, "8" is not 8); no .inf or .nan anywhere
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _once_each(values: list, what: str = "") -> list:
    """A value listed twice in an axis would plan two cells with one key: one measurement would silently replace
    the other."""
    seen = set()
    for v in values:
        key = v if isinstance(v, (str, int, float, bool)) else repr(v)
        if key in seen:
            raise ValueError(f"{what or v!r} is listed twice; each value of an axis once")
        seen.add(key)
    return values


class SyntheticShape(Strict):
    family: Literal["opt", "llama", "mistral"]
    hidden_size: PositiveInt
    layers: PositiveInt
    heads: PositiveInt
    kv_heads: PositiveInt | None = None
    ffn: PositiveInt
    vocab: PositiveInt
    max_positions: PositiveInt = 4096

    @model_validator(mode="after")
    def _divides(self):
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of heads {self.heads}")
        if self.kv_heads and self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        return self


SOURCES = ("hub", "path", "gguf", "synthetic")


class ModelEntry(Strict):
    hub: str | None = None
    revision: str | None = None
    path: str | None = None
    gguf: str | None = None
    synthetic: Union[str, SyntheticShape, None] = None
    label: str | None = None
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in SOURCES if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"needs exactly one source of {', '.join(SOURCES)}; got "
                             f"{', '.join(given) if given else 'none'}")
        if self.revision and not self.hub:
            raise ValueError("revision goes with hub only")
        if isinstance(self.synthetic, str) and self.synthetic not in SYNTHETIC_ARCHITECTURES:
            near = difflib.get_close_matches(self.synthetic, SYNTHETIC_ARCHITECTURES, n=1)
            raise ValueError(f"unknown synthetic architecture {self.synthetic!r}"
                             + (f"; did you mean {near[0]!r}?" if near else "")
                             + f" (known: {', '.join(SYNTHETIC_ARCHITECTURES)}, or a mapping of shapes)")
        return self

    @property
    def source(self) -> str:
        return next(k for k in SOURCES if getattr(self, k) is not None)

    def default_label(self) -> str:
        if self.label:
            return self.label
        if self.hub:
            return self.hub.split("/")[-1]
        if self.path:
            return Path(self.path).name
        if self.gguf:
            return Path(self.gguf).name.removesuffix(".gguf")
        s = self.synthetic
        return s if isinstance(s, str) else f"synthetic-{s.family}-{s.hidden_size}x{s.layers}"

    def spec(self, base_dir: Path) -> ModelSpec:
        """The entry for the worker, local paths (`~` expanded) made absolute against the grid file's folder."""
        location = self.model_dump(exclude_none=True, exclude_defaults=True)[self.source]
        if self.source in ("path", "gguf") and not location.startswith("pkg:"):
            location = str(expand(location, base_dir).resolve())
        return ModelSpec(self.source, location, self.default_label(), self.revision, self.trust_remote_code)


class PrecisionEntry(Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        defaults = REGISTRY[self.name].parse_options({}).model_dump()
        # the calibration file is on the row (calib_text, calib_sha256), not in the label
        changed = {k: Path(v).name if k in grid_paths(self.name) else v for k, v in self.options.items()
                   if defaults.get(k) != v and k != "calib_path"}
        return self.name + ("(" + ",".join(f"{k}={v}" for k, v in sorted(changed.items())) + ")" if changed else "")


class KvOptions(Strict):
    q_group_size: Literal[32, 64, 128] = KV_DEFAULTS["q_group_size"]
    residual_length: NonNegativeInt = KV_DEFAULTS["residual_length"]


class KvCacheEntry(Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self):
        if self.name not in KV_CACHES:
            near = difflib.get_close_matches(self.name, KV_CACHES, n=1)
            raise ValueError(f"unknown kv_cache {self.name!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                             + f" (known: {', '.join(KV_CACHES)})")
        if self.name not in KV_GROUPED:
            if self.options:
                raise ValueError(f"{self.name} takes no options")
        else:
            self.options = KvOptions(**self.options).model_dump()
        return self

    @property
    def label(self) -> str:
        return kv_label(self.name, self.options)

    def spec(self) -> KvSpec:
        return KvSpec(self.name, self.options, self.label)


class Throughput(Strict):
    # one offline figure per unit: `requests` prompts of `prompt_tokens` handed to the engine together, each generating
    # exactly `new_tokens`; generated tokens per wall-clock second (the serving engine schedules them as it would)
    requests: PositiveInt = 64
    prompt_tokens: PositiveInt = 512
    new_tokens: PositiveInt = 128


class Generation(Strict):
    new_tokens: list[PositiveInt] = Field(min_length=1)
    batch_sizes: list[PositiveInt] = Field(default=[1], min_length=1)
    prompt_tokens: list[PositiveInt] = Field(default=[32], min_length=1)  # an axis: one number or a list
    warmup: NonNegativeInt = 2
    # timed runs: a number, or auto: until the decode interval's half-width is within target_halfwidth of its mean
    # (at least 3 runs), at most max_repeats runs and max_seconds of timed work per cell
    repeats: Union[PositiveInt, Literal["auto"]] = 5
    max_repeats: PositiveInt = 30
    max_seconds: PositiveFloat = 60
    target_halfwidth: PositiveFloat = 0.02
    # eager: DynamicCache, one kernel launch at a time; compiled: StaticCache + torch.compile of the decode step
    decode: list[Literal["eager", "compiled"]] = Field(default=["eager"], min_length=1)
    # one more decode step per cell under torch.profiler: its top kernels (CUDA) or operators (CPU), after the timing
    profile: bool = False
    throughput: Throughput | None = None  # off unless given
    # native: DynamicCache in the model's dtype; quanto-int4/int2, hqq-int8/int4/int2: transformers' QuantizedCache
    kv_cache: list[KvCacheEntry] = Field(default=[KvCacheEntry(name="native")], min_length=1)

    @field_validator("kv_cache", mode="before")
    @classmethod
    def _kv_entries(cls, v):
        if not isinstance(v, list):
            return v
        return [{"name": x} if isinstance(x, str) else
                {"name": x["name"], "options": {k: y for k, y in x.items() if k != "name"}}
                if isinstance(x, dict) and "name" in x else x for x in v]

    @field_validator("prompt_tokens", mode="before")
    @classmethod
    def _one_length(cls, v):
        return [v] if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("new_tokens", "batch_sizes", "decode", "prompt_tokens")
    @classmethod
    def _each_once(cls, v):
        return _once_each(v)

    @model_validator(mode="after")
    def _kv_unique(self):
        labels = [k.label for k in self.kv_cache]
        if len(set(labels)) != len(labels):
            raise ValueError(f"kv_cache: an entry is listed twice ({labels})")
        return self

    @property
    def quantized_kv(self) -> bool:
        return any(KV_CACHES[k.name] for k in self.kv_cache)


class Perplexity(Strict):
    path: str | None = None
    protocol: Literal["gptq", "strided"] = "gptq"
    seqlen: PositiveInt = 2048
    stride: PositiveInt = 512
    max_windows: PositiveInt | None = None
    # windows per forward pass; null: 8, or 1 for precisions whose numbers depend on batching (LLM.int8)
    batch_size: PositiveInt | None = None
    # protocol kv-continuation, measured per kv_cache entry when the grid has a quantized one: `kv_windows` windows
    # of the test split, `kv_prefill` tokens into the cache, then `kv_continuation` tokens scored one at a time
    kv_windows: PositiveInt = 4
    kv_prefill: PositiveInt = 1024
    kv_continuation: PositiveInt = 512

    @model_validator(mode="after")
    def _stride(self):
        if self.protocol == "strided" and self.stride > self.seqlen:
            raise ValueError(f"stride {self.stride} is larger than seqlen {self.seqlen}")
        return self


class Resources(Strict):
    gpus_per_task: NonNegativeFloat = 1
    cpus_per_task: NonNegativeFloat | None = None  # None: 1 with GPUs; on CPU, a whole node, so units never share cores
    timeout_s: PositiveFloat = 3600
    retries: NonNegativeInt = 1


class Cost(Strict):
    usd_per_gpu_hour: PositiveFloat  # rows get usd_per_million_tokens at each cell's end-to-end throughput


MemoryBudget = Annotated[ByteSize, Field(ge=2 ** 20, le=2 ** 50)]  # 1 MiB to 1 PiB


class QualityBudget(Strict):
    # the most a precision may lose against the baseline and still be "within budget" in the report's decision
    kl: PositiveFloat = 0.02             # mean KL(P_baseline || P) over scored positions, nats
    ppl_change_pct: PositiveFloat = 1.0  # |Δ perplexity| in %, its paired 95% interval within ±this


class ReportSettings(Strict):
    # GPU memory sizes for the fit table ("fits a 16 GiB GPU up to batch 6 at 4096 tokens"), beside the GPU that ran
    # the sweep: bytes, or text like 16GiB, 24GB
    memory_budgets: list[MemoryBudget] = Field(default_factory=list)
    quality_budget: QualityBudget = Field(default_factory=QualityBudget)


class Grid(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output: str | None = None
    # what runs the model, an axis: hf (transformers, tasks/engines/hf.py), vllm (tasks/engines/vllm.py)
    engine: list[Literal[ENGINES]] = Field(default=["hf"], min_length=1)
    models: list[ModelEntry] = Field(min_length=1)
    precisions: list[PrecisionEntry] = Field(min_length=1)
    baseline: str | None = None
    generation: Generation
    perplexity: Union[Perplexity, Literal[False]] = Field(default_factory=Perplexity)
    resources: Resources = Field(default_factory=Resources)
    cost: Cost | None = None
    report: ReportSettings = Field(default_factory=ReportSettings)

    @field_validator("precisions", mode="before")
    @classmethod
    def _precision_entries(cls, v):
        if not isinstance(v, list):
            return v
        out = []
        for item in v:
            if isinstance(item, str):
                out.append({"name": item})
            elif isinstance(item, dict) and "name" in item:
                out.append({"name": item["name"], "options": {k: x for k, x in item.items() if k != "name"}})
            else:
                out.append(item)
        return out

    @field_validator("engine", mode="before")
    @classmethod
    def _one_engine(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("engine")
    @classmethod
    def _engines_once(cls, v):
        return _once_each(v)

    @field_validator("perplexity", mode="before")
    @classmethod
    def _perplexity_flag(cls, v):
        if v is True or v is None:
            return {}
        return v

    @model_validator(mode="after")
    def _consistent(self):
        labels = [m.default_label() for m in self.models]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ValueError(f"models: two entries share the label {sorted(dup)[0]!r}; give one a `label`")
        sources = [m.model_dump(exclude={"label"}) for m in self.models]
        for i, src in enumerate(sources):
            if src in sources[:i]:
                raise ValueError(f"models[{i}] is the same model as models[{sources.index(src)}] "
                                 f"(labels do not make a different measurement)")
        plabels = [p.label for p in self.precisions]
        if len(set(plabels)) != len(plabels):
            raise ValueError(f"precisions: an entry is listed twice ({plabels})")
        self._several_gpus()
        if self.baseline is None:
            self.baseline = plabels[0]
        elif self.baseline not in plabels:
            names = [p.name for p in self.precisions]
            if names.count(self.baseline) == 1:
                self.baseline = plabels[names.index(self.baseline)]
            else:
                raise ValueError(f"baseline {self.baseline!r} is not one of the precisions ({', '.join(plabels)})")
        return self

    def _several_gpus(self):
        """A unit over several GPUs: transformers splits its layers across them (eager decode: its compiled static
        cache lives on one GPU), vLLM runs one tensor-parallel rank per GPU (no perplexity: the hidden states it is
        scored from are read in the unit's own process, and the ranks run in others)."""
        gpus = self.resources.gpus_per_task
        if gpus <= 1:
            return
        if gpus != int(gpus):
            raise ValueError(f"resources.gpus_per_task: a unit over several GPUs holds a whole number of them, not "
                             f"{gpus:g}")
        if "hf" in self.engine and "compiled" in self.generation.decode:
            raise ValueError(f"resources.gpus_per_task: {gpus:g} GPUs per unit: engine hf splits the model's layers "
                             f"across them and decodes eager only (generation.decode: [eager])")
        if "vllm" in self.engine and self.perplexity:
            raise ValueError(f"resources.gpus_per_task: {gpus:g} GPUs per unit: engine vllm runs tensor parallel and "
                             f"scores no perplexity there (perplexity: false, or measure quality with one GPU)")


# ---------------------------------------------------------------------------------------------------------- loading

def _precision_problems(raw: dict) -> list[str]:
    """Unknown precision names and bad options, named by field path (pydantic cannot see the registry)."""
    problems = []
    items = raw.get("precisions")
    if not isinstance(items, list):
        return problems
    for i, item in enumerate(items):
        name = item if isinstance(item, str) else item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            continue
        if name not in REGISTRY:
            near = difflib.get_close_matches(name, REGISTRY, n=1)
            problems.append(f"precisions[{i}]: unknown precision {name!r}"
                            + (f"; did you mean {near[0]!r}?" if near else "")
                            + f" (known: {', '.join(REGISTRY)})")
            continue
        if isinstance(item, dict):
            opts = {k: v for k, v in item.items() if k != "name"}
            try:
                REGISTRY[name].parse_options(opts)
            except ValidationError as e:
                problems += _format_errors(e, prefix=f"precisions[{i}]", model=REGISTRY[name].loading.options)
    return problems


def _walk_fields(model: type[BaseModel], path: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `path` (for 'did you mean' on unknown keys)."""
    import typing

    current = model
    for part in path:
        if isinstance(part, int) or current is None:
            continue
        f = current.model_fields.get(part)
        if f is None:
            return None
        nxt = None
        for t in [f.annotation, *typing.get_args(f.annotation)]:
            for t2 in [t, *typing.get_args(t)]:
                if isinstance(t2, type) and issubclass(t2, BaseModel):
                    nxt = t2
        current = nxt
    return current


def _loc(parts) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in ("str", "SyntheticShape", "Perplexity", "literal[False]", "function-after[_one_source()]"):
            continue
        else:
            out += ("." if out else "") + str(p)
    return out


def _format_errors(err: ValidationError, prefix: str = "", model: type[BaseModel] = None) -> list[str]:
    model = model or Grid
    lines = []
    for e in err.errors():
        if "literal[False]" in e["loc"] and isinstance(e.get("input"), dict):
            continue  # the `perplexity: false` branch of a mapping that has its own errors
        loc = [p for p in e["loc"]  # (pydantic's union branch names: not field names)
               if not (isinstance(p, str) and ("[" in p or "-" in p or p[0].isupper() or p == "str"))]
        where = ".".join(x for x in [prefix, _loc(loc)] if x) or "(top level)"
        if e["type"] == "extra_forbidden":
            key = loc[-1]
            owner = _walk_fields(model, tuple(loc[:-1]))
            near = difflib.get_close_matches(str(key), owner.model_fields, n=1) if owner else []
            lines.append(f"{where}: unknown key" + (f"; did you mean {near[0]!r}?" if near else ""))
        elif e["type"] == "missing":
            lines.append(f"{where}: required field missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = f" (got {got!r})" if not isinstance(got, (dict, list)) and e["type"] != "value_error" else ""
            lines.append(f"{where}: {msg}{shown}")
    # union branches repeat themselves; keep the first message per field path
    seen, unique = set(), []
    for line in lines:
        key = line.split(":")[0]
        if key not in seen:
            seen.add(key)
            unique.append(line)
    return unique


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise BadInput(f"--set {item!r}: expected KEY=VALUE, e.g. --set perplexity.max_windows=8")
    key, _, value = item.partition("=")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise BadInput(f"--set {item!r}: bad key {key!r}")
    if not value.strip():
        raise BadInput(f"--set {key}: the value is empty; write it out (null, false, [], ...)")
    try:
        parsed = load_yaml(value, f"--set {key}")
    except yaml.YAMLError as e:
        raise BadInput(f"--set {key}: value {value!r} is not valid YAML ({getattr(e, 'problem', None) or e})")
    return key.split("."), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part) if isinstance(node, dict) else None
            if nxt is False or nxt is None:
                nxt = {}
                node[part] = nxt
            if not isinstance(nxt, dict):
                raise BadInput(f"--set {'.'.join(path)}: {'.'.join(path[:i + 1])} is not a mapping")
            node = nxt
        node[path[-1]] = value
    return raw


def _lines(a, b) -> str:
    la, lb = a.start_mark.line + 1, b.start_mark.line + 1
    return f"line {la}" if la == lb else f"lines {la} and {lb}"


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a mapping with a key given twice (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            merges = [k for k, _ in node.value if k.tag == "tag:yaml.org,2002:merge"]
            if len(merges) > 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the merge key << is given twice ({_lines(merges[0], merges[1])}); merge several "
                                f"mappings with << [*a, *b]",
                    merges[1].start_mark)
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                    seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the constructor says so below
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is given twice ({_lines(first, key_node)}); the second would "
                                    f"silently win", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


MAX_DEPTH = 32          # a grid nests a few levels; deeper is refused before pydantic or the planner walk it
MAX_VALUES = 100_000    # values in a grid after its aliases are expanded (a few hundred in practice)


def check_shape(data: Any, where: str) -> Any:
    """`data` nests at most MAX_DEPTH deep and holds at most MAX_VALUES values once aliases are expanded (an alias
    repeated inside aliases grows exponentially: it is counted as what it expands to, up to the cap)."""
    count, stack = 0, [(data, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise BadInput(f"{where}: more than {MAX_VALUES:,} values once its aliases are expanded")
        if depth > MAX_DEPTH:
            raise BadInput(f"{where}: nests deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            stack += [(x, depth + 1) for kv in node.items() for x in kv]
        elif isinstance(node, list):
            stack += [(x, depth + 1) for x in node]
    return data


def load_yaml(text: str, where: str) -> Any:
    """YAML text as data (safe: nothing in it runs code), keys given once, of bounded depth and size."""
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)
    except RecursionError:
        raise BadInput(f"{where}: nests too deep to read") from None
    return check_shape(data, where)


def read_yaml(path: Path) -> Any:
    data = read_regular_file(path, GRID_CAP, "grid file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: the grid file is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})")
    try:
        return load_yaml(text, str(path))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        kind = "" if isinstance(e, yaml.constructor.ConstructorError) and "given twice" in str(e.problem) \
            else "YAML syntax error: "
        raise BadInput(f"{where}: {kind}{e.problem}")
    except yaml.YAMLError as e:
        raise BadInput(f"{path}: YAML error: {e}")


def load_grid(path: str | Path, overrides: list[str] = ()) -> Grid:
    path = expand(path)
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: the grid must be a mapping of fields (name, models, precisions, ...), "
                       f"got {type(raw).__name__}")
    raw = apply_overrides(raw, list(overrides))
    problems = _precision_problems(raw)
    if problems:
        raise BadInput(_message(path, problems))
    try:
        grid = Grid.model_validate(raw)
    except ValidationError as e:
        raise BadInput(_message(path, _format_errors(e)))
    grid._base_dir = path.resolve().parent
    for entry in grid.precisions:  # paths among a precision's options: made absolute against the grid file's folder
        for k in grid_paths(entry.name):
            if isinstance(entry.options.get(k), str):
                entry.options[k] = str(expand(entry.options[k], grid._base_dir).resolve())
    return grid


def grid_paths(precision: str) -> list[str]:
    """The options of a precision that are paths relative to the grid file (their fields say so)."""
    fields = REGISTRY[precision].loading.options.model_fields
    return [k for k, f in fields.items() if (f.json_schema_extra or {}).get("grid_path")]


def _message(path: Path, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{path}: {problems[0]}"
    return f"{path}: {len(problems)} problems\n" + "\n".join(f"  {p}" for p in problems)
