"""lm-evaluation-harness task YAMLs, read as they are.

A user arriving from lm-eval brings task files like

    task: my_boolq
    dataset_path: json
    dataset_kwargs: {data_files: {test: boolq.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"
    doc_to_choice: ["no", "yes"]
    doc_to_target: label
    metric_list: [{metric: acc}, {metric: acc_norm}]

and gets the items lm-eval would build: the data through `datasets.load_dataset` (as lm-eval loads it), the
templates through Jinja2 with lm-eval's settings, and lm-eval's rules for what a rendered template means (a
field name, a digit = an index, a list literal). A key tunelab does not implement is a one-line error naming
it and its line, never ignored. Extensions for the data the field ships: .tsv files, headerless CSV with
`column_names`, a gold that is a boolean, choices from separate columns (`{{[a, b, c]}}`, as in lm-eval).
"""

from __future__ import annotations

import ast
import re
import string
from pathlib import Path

from .tasks import Item, Task, TaskError

OUTPUT_TYPES = {"multiple_choice": "multiple_choice", "generate_until": "generate",
                "loglikelihood": "loglikelihood", "loglikelihood_rolling": "perplexity"}
SUPPORTED = {"task", "dataset_path", "dataset_name", "dataset_kwargs", "test_split", "validation_split",
             "training_split", "fewshot_split", "doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter",
             "fewshot_delimiter", "num_fewshot", "fewshot_config", "output_type", "generation_kwargs", "filter_list",
             "metric_list", "description"}
METADATA = {"tag", "group", "metadata", "task_alias", "group_alias", "dataset_kwargs"}  # no effect on scores
METRICS = {"multiple_choice": {"acc", "acc_norm", "f1"}, "generate": {"exact_match"},
           "loglikelihood": {"acc", "perplexity"}, "perplexity": {"word_perplexity", "byte_perplexity",
                                                                   "bits_per_byte"}}
METRIC_KEYS = {"metric", "aggregation", "higher_is_better", "ignore_case", "ignore_punctuation", "regexes_to_ignore",
               "average", "hf_evaluate"}


class Function(str):
    """A `!function module.name` tag: Python code lm-eval imports; tunelab refuses it with a message."""


def yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: Function(loader.construct_scalar(node)))
    return Loader


def _env():
    # lm-eval's apply_template: Environment(BaseLoader, StrictUndefined, keep_trailing_newline) + regex_replace
    import jinja2

    env = jinja2.Environment(loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    return env


def load_lm_eval_task(path: Path, spec: dict, lines: dict[str, int]) -> Task:
    def at(key: str) -> str:
        return f"{path}:{lines.get(key, 1)}"

    for k, v in spec.items():
        if k not in SUPPORTED and k not in METADATA:
            if k in ("repeats",) and v == 1 or k == "should_decontaminate" and not v:
                continue
            raise TaskError(f"{at(k)}: lm-eval key '{k}' is not supported by tunelab (supported: "
                            f"{', '.join(sorted(SUPPORTED))})")
        if isinstance(v, Function):
            raise TaskError(f"{at(k)}: {k}: !function {v} (Python code) is not supported; write it as a Jinja2 "
                            f"template")
    otype = spec.get("output_type", "generate_until")
    if otype not in OUTPUT_TYPES:
        raise TaskError(f"{at('output_type')}: output_type must be one of {', '.join(OUTPUT_TYPES)}, got {otype!r}")
    kind = OUTPUT_TYPES[otype]
    env = _env()
    templates = {}
    for k in ("doc_to_text", "doc_to_target", "doc_to_choice", "description"):
        v = spec.get(k)
        if isinstance(v, str):
            try:
                templates[k] = env.from_string(v)
            except Exception as e:  # jinja2.TemplateSyntaxError
                raise TaskError(f"{at(k)}: {k}: malformed Jinja2 template ({e})") from None
        elif k == "doc_to_choice" and isinstance(v, (list, dict)) or k == "doc_to_target" and isinstance(v, int) \
                or v is None:
            pass
        else:
            raise TaskError(f"{at(k)}: {k} must be a Jinja2 template string, got {type(v).__name__}")
    for k in {"multiple_choice": ("doc_to_text", "doc_to_choice", "doc_to_target"),
              "generate": ("doc_to_text", "doc_to_target"), "loglikelihood": ("doc_to_text", "doc_to_target"),
              "perplexity": ("doc_to_target",)}[kind]:
        if k not in spec:
            raise TaskError(f"{path}: missing key '{k}' for output_type {otype}")

    splits = _load_splits(path, spec, at)
    scored = spec.get("test_split") or spec.get("validation_split")
    if not scored:
        raise TaskError(f"{path}: give test_split or validation_split (the split that is scored)")
    for k in ("test_split", "validation_split", "training_split", "fewshot_split"):
        if spec.get(k) and spec[k] not in splits:
            raise TaskError(f"{at(k)}: {k} '{spec[k]}' is not in the data (splits: {', '.join(splits)})")
    fs_name = spec.get("fewshot_split") or spec.get("training_split") or spec.get("validation_split") or scored

    def render(key: str, doc: dict, where: str):
        import jinja2

        try:
            return templates[key].render(**doc)
        except jinja2.UndefinedError as e:
            raise TaskError(f"{where}: {key}: {e.message} (row fields: {', '.join(doc)})") from None
        except Exception as e:
            raise TaskError(f"{where}: {key}: {type(e).__name__}: {e}") from None

    def field_or_template(key: str, doc: dict, where: str):
        v = spec[key]
        if isinstance(v, str) and v in doc:  # lm-eval: a bare column name is that column's value
            return doc[v]
        return render(key, doc, where)

    def item_of(doc: dict, n: int, split: str) -> Item:
        where = f"{at('doc_to_text') if 'doc_to_text' in spec else path} (split {split}, row {n})"
        desc = render("description", doc, where) if "description" in templates else ""
        if kind == "perplexity":
            return Item("", response=str(field_or_template("doc_to_target", doc, where)), description="")
        text = field_or_template("doc_to_text", doc, where)
        text = str(text)
        if kind == "multiple_choice":
            dc = spec["doc_to_choice"]
            if isinstance(dc, list):
                choices = list(dc)
            elif isinstance(dc, dict):
                choices = list(dc.values())
            elif dc in doc:
                choices = doc[dc]
            else:
                rendered = render("doc_to_choice", doc, where)
                try:
                    choices = ast.literal_eval(rendered)
                except (ValueError, SyntaxError):
                    raise TaskError(f"{where}: doc_to_choice rendered {rendered[:80]!r}, not a list") from None
            if not isinstance(choices, (list, tuple)) or not choices:
                raise TaskError(f"{where}: doc_to_choice must give a non-empty list, got {choices!r}"[:200])
            choices = [str(c) for c in choices]
            return Item(text, choices, _gold(spec["doc_to_target"], doc, choices, render, where), description=desc)
        target = _target(spec["doc_to_target"], doc, render, where)
        if kind == "loglikelihood":
            return Item(text, target=str(target), description=desc)
        return Item(text, target=str(target), response=str(target), description=desc)

    items = [item_of(d, n, scored) for n, d in enumerate(splits[scored], 1)]
    pool = items if fs_name == scored else [item_of(d, n, fs_name) for n, d in enumerate(splits[fs_name], 1)]
    fc = spec.get("fewshot_config") or {}
    if not isinstance(fc, dict) or set(fc) - {"sampler"}:
        raise TaskError(f"{at('fewshot_config')}: fewshot_config supports only sampler (first_n or default), "
                        f"got {', '.join(fc) if isinstance(fc, dict) else fc}")
    sampler = fc.get("sampler", "default")
    if sampler not in ("first_n", "default"):
        raise TaskError(f"{at('fewshot_config')}: sampler must be first_n or default, got {sampler!r}")
    task = Task(str(spec.get("task", path.stem)), kind, items, [] if pool is items else pool,
                sampler="first_n" if sampler == "first_n" else "random",
                num_fewshot=int(spec.get("num_fewshot") or 0),
                about=f"lm-eval task file {path.name} ({otype}, split {scored}"
                      + (f", shots from {fs_name}" if fs_name != scored else "") + ")")
    task.target_delimiter = str(spec.get("target_delimiter", " "))
    task.fewshot_delimiter = str(spec.get("fewshot_delimiter", "\n\n"))
    opts: dict = {"filters": _filters(spec.get("filter_list"), at), "em": {}}
    task.metrics = _metrics(spec.get("metric_list"), kind, at, opts)
    if kind == "generate":
        gk = spec.get("generation_kwargs") or {}
        bad = set(gk) - {"until", "max_gen_toks", "do_sample", "temperature"}
        if bad:
            raise TaskError(f"{at('generation_kwargs')}: generation_kwargs key '{sorted(bad)[0]}' is not supported "
                            f"(supported: until, max_gen_toks, do_sample, temperature)")
        until = gk.get("until", ["\n\n"])  # lm-eval's default stop when none is given
        task.stop = [until] if isinstance(until, str) else list(until)
        task.max_new_tokens = int(gk.get("max_gen_toks", 256))
        if gk.get("do_sample"):
            opts["sampling"] = {"do_sample": True, "temperature": float(gk.get("temperature") or 1.0)}
        elif gk.get("temperature"):
            raise TaskError(f"{at('generation_kwargs')}: temperature {gk['temperature']} without do_sample: true "
                            "would be ignored (greedy)")
    task.lm_eval = opts
    return task


def _gold(dt, doc: dict, choices: list[str], render, where: str) -> int:
    """lm-eval's doc_to_target for multiple choice: an index, or the answer text; also a boolean (False/True =
    choice 0/1)."""
    if isinstance(dt, bool):
        g = int(dt)
    elif isinstance(dt, int):
        g = dt
    else:
        v = doc[dt] if dt in doc else render("doc_to_target", doc, where)
        if isinstance(v, bool) or (isinstance(v, str) and v in ("True", "False") and v not in choices):
            g = int(v in (True, "True"))
        elif isinstance(v, int):
            g = v
        elif isinstance(v, str) and v.strip().isdigit():
            g = int(v.strip())
        elif isinstance(v, str) and v in choices:
            g = choices.index(v)
        else:
            raise TaskError(f"{where}: doc_to_target gave {v!r}: neither an index nor one of the choices "
                            f"{choices}"[:240])
    if not 0 <= g < len(choices):
        raise TaskError(f"{where}: gold index {g} out of range for {len(choices)} choices (a 1-based index? "
                        "write doc_to_target: \"{{answer - 1}}\")")
    return g


def _target(dt, doc: dict, render, where: str):
    if isinstance(dt, int):
        return dt
    v = doc[dt] if dt in doc else render("doc_to_target", doc, where)
    if isinstance(v, str) and len(v) >= 2 and v[0] == "[" and v[-1] == "]":
        try:
            v = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            pass
    if isinstance(v, list):  # lm-eval allows several references; tunelab scores against the first
        v = v[0]
    return v


def _filters(spec, at) -> list[tuple[str, list[dict]]]:
    if spec is None:
        return []
    out = []
    if not isinstance(spec, list):
        raise TaskError(f"{at('filter_list')}: filter_list must be a list of {{name, filter: [...]}}")
    for f in spec:
        if not isinstance(f, dict) or set(f) - {"name", "filter"}:
            raise TaskError(f"{at('filter_list')}: each filter_list entry has name and filter, got {f}")
        steps = []
        for step in f.get("filter") or []:
            fn = step.get("function")
            if fn == "regex":
                bad = set(step) - {"function", "regex_pattern", "group_select", "fallback"}
                if bad:
                    raise TaskError(f"{at('filter_list')}: regex filter key '{sorted(bad)[0]}' is not supported")
                try:
                    re.compile(step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"))
                except re.error as e:
                    raise TaskError(f"{at('filter_list')}: bad regex_pattern ({e})") from None
                steps.append(step)
            elif fn == "take_first":  # one generation per item here, so taking the first is what happens
                continue
            else:
                raise TaskError(f"{at('filter_list')}: filter function '{fn}' is not supported (regex, take_first)")
        out.append((str(f.get("name", "none")), steps))
    return out


def _metrics(spec, kind: str, at, opts: dict) -> list[str]:
    if spec is None:
        return {"multiple_choice": ["acc", "acc_norm"], "generate": ["exact_match"],
                "loglikelihood": ["perplexity", "acc"],
                "perplexity": ["word_perplexity", "byte_perplexity", "bits_per_byte"]}[kind]
    out = []
    for m in spec:
        name = m.get("metric") if isinstance(m, dict) else None
        if name not in METRICS[kind]:
            raise TaskError(f"{at('metric_list')}: metric {name!r} is not supported for this output_type "
                            f"(supported: {', '.join(sorted(METRICS[kind]))})")
        bad = set(m) - METRIC_KEYS
        if bad:
            raise TaskError(f"{at('metric_list')}: metric key '{sorted(bad)[0]}' is not supported")
        if name == "f1" and m.get("average") != "macro":
            raise TaskError(f"{at('metric_list')}: metric f1 is supported as macro-F1 (average: macro, KoBEST's); "
                            "lm-eval's plain f1 (binary) is not")
        agg = m.get("aggregation", "mean")
        if name != "f1" and agg not in ("mean", "perplexity", "weighted_perplexity", "bits_per_byte"):
            raise TaskError(f"{at('metric_list')}: aggregation {agg!r} is not supported")
        if name == "exact_match":
            opts["em"] = {k: m[k] for k in ("ignore_case", "ignore_punctuation", "regexes_to_ignore") if k in m}
        out.append(name)
    return out


def apply_filter(text: str, steps: list[dict]) -> str:
    """lm-eval's RegexFilter (group_select, fallback "[invalid]") over one generation; take_first is implicit."""
    for step in steps:
        pattern = re.compile(step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"))
        match = pattern.findall(text)
        if match:
            match = match[int(step.get("group_select", 0))]
            if isinstance(match, tuple):
                match = [m for m in match if m]
                match = match[0] if match else step.get("fallback", "[invalid]")
            text = match.strip()
        else:
            text = step.get("fallback", "[invalid]")
    return text


def exact_match(prediction: str, reference: str, ignore_case: bool = False, ignore_punctuation: bool = False,
                regexes_to_ignore: list[str] | None = None) -> float:
    """HF evaluate's exact_match as lm-eval uses it: regexes removed from both, then case, then punctuation."""
    for r in regexes_to_ignore or []:
        prediction, reference = re.sub(r, "", prediction), re.sub(r, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def _load_splits(path: Path, spec: dict, at) -> dict[str, list[dict]]:
    """The dataset as lm-eval loads it: datasets.load_dataset(dataset_path, dataset_name, **dataset_kwargs), with
    data files relative to the task file; .tsv files read as tab-separated without quoting (KoBEST's)."""
    import datasets

    dp = spec.get("dataset_path")
    if not dp:
        raise TaskError(f"{path}: missing key 'dataset_path' (json, csv, parquet with dataset_kwargs.data_files, "
                        f"or a local folder)")
    kwargs = dict(spec.get("dataset_kwargs") or {})
    bad = set(kwargs) - {"data_files", "data_dir", "sep", "delimiter", "column_names", "header", "quoting"}
    if bad:
        raise TaskError(f"{at('dataset_kwargs')}: dataset_kwargs key '{sorted(bad)[0]}' is not supported")

    def resolve(f):
        if isinstance(f, dict):
            return {k: resolve(v) for k, v in f.items()}
        if isinstance(f, list):
            return [resolve(v) for v in f]
        p = Path(str(f)).expanduser()
        return str(p if p.is_absolute() or p.exists() or not (path.parent / p).exists() else path.parent / p)

    files = resolve(kwargs.pop("data_files")) if "data_files" in kwargs else None
    local = path.parent / dp if (path.parent / dp).is_dir() else Path(dp).expanduser()
    if dp in ("json", "csv", "parquet"):
        if files is None:
            raise TaskError(f"{at('dataset_path')}: dataset_path {dp} needs dataset_kwargs: {{data_files: ...}}")
        flat = [files] if isinstance(files, str) else (list(files.values()) if isinstance(files, dict) else files)
        flat = [f for v in flat for f in ([v] if isinstance(v, str) else v)]
        for f in flat:
            if not Path(f).is_file():
                raise TaskError(f"{at('dataset_kwargs')}: data file not found: {f}")
        if dp == "csv" and all(f.endswith(".tsv") for f in flat):
            kwargs.setdefault("sep", "\t")
            kwargs.setdefault("quoting", 3)  # csv.QUOTE_NONE: KoBEST's text holds unbalanced quotes
        if dp == "csv" and "column_names" in kwargs:
            kwargs.setdefault("header", None)  # headerless CSV (MMLU's) with the names given in the task
        args, kw = (dp,), {"data_files": files, **kwargs}
    elif local.is_dir():
        args, kw = (str(local),), {"data_files": files, **kwargs} if files else kwargs
        if spec.get("dataset_name"):
            kw["name"] = spec["dataset_name"]
    else:
        args, kw = (dp,), dict(kwargs, **({"name": spec["dataset_name"]} if spec.get("dataset_name") else {}))
    try:
        if local.is_dir() and (local / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(local))
        else:
            ds = datasets.load_dataset(*args, **kw)
    except Exception as e:
        raise TaskError(f"{at('dataset_path')}: can't load dataset {dp!r} ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(ds, datasets.DatasetDict):
        ds = datasets.DatasetDict({"train": ds})
    return {name: [dict(r) for r in split] for name, split in ds.items()}
