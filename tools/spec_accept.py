"""Tokens per pass on real text (issue #14): what speculative decoding gains with a real target
and drafts built here.

    python -m ringllm.tools.spec_accept --out DIR [--model DIR] [--drafts ngram,fp8,1/2,1/3,1/6]
                                        [--spec-tokens 4,8,16] [--prompts NAME,...] [--max-new-tokens 64]
                                        [--drafts-dir DIR] [--pass-seconds S] [--threads 1] [--jobs N]

For each prompt of PROMPTS (kept here, so every run of the tool measures the same text) it runs
`ringllm generate` (in this process, through ringllm.cli.main: the resident engine, float32, cpu,
the chat template, greedy) once without a draft, the reference output, then once per draft and
--spec-tokens K. Per run it keeps the `speculation` metrics (tokens per decode pass, acceptance)
and whether the completion equals the reference's: greedy float32 decoding with a draft is exact,
so any difference is a failure, reported in the table, and the exit code is 1.

Drafts: `ngram` (prompt lookup), `fp8` (the target's FP8 copy, `ringllm convert --to fp8`), a
fraction `A/B` or a count `N` of the target's layers (a layer-truncated draft: tools/make_draft),
or a model directory. Drafts the tool builds go to --drafts-dir (default OUT/drafts) and are
reused from there. Writes spec-accept.json (every run, the pair descriptions, the command) and
spec-accept.txt (tokens per pass and acceptance per draft x K, per prompt and the mean) into
--out, and each run's metrics file into OUT/runs/. --pass-seconds S adds a tok/s column: the
mean tokens per pass / S (a verification pass's time measured elsewhere, e.g. the H200's 70B pass).

Cost: the default set is 8 prompts x (1 + 5 drafts x 3 K) = 128 runs of 64 tokens; the FP8
draft dominates (dequantized per use on cpu). On a 2-core VM shared with other jobs it took 32
min with --jobs 2 (two processes; each torch at --threads 1, as spinning threads on busy cores
made runs 20x slower). `--prompts`, `--drafts` and `--spec-tokens` take a subset.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
import time
from fractions import Fraction
from pathlib import Path

from ringllm.checkpoint.errors import RingllmError

SPEC_TOKENS = (4, 8, 16)
DRAFTS = ("ngram", "fp8", "1/2", "1/3", "1/6")
MAX_NEW_TOKENS = 64

_PASSAGE = ("The Danube rises in the Black Forest in Germany and flows about 2,850 kilometres to the Black Sea. "
            "On its way it passes through ten countries and four capital cities: Vienna, Bratislava, Budapest "
            "and Belgrade. For centuries it was a border of the Roman Empire, and today it is one of Europe's "
            "busiest waterways, carrying grain, ore and tourists between the Alps and the delta in Romania.")
# (name, prompt): chat and explanations, a poem, code, extraction and summarising of a given
# passage, a copying prompt, a list. Fixed: the figures in docs/benchmarks.md come from these.
PROMPTS = (
    ("capital", "What is the capital of France? Explain in detail."),
    ("fridge", "Explain how a refrigerator keeps food cold, in simple terms."),
    ("poem", "Write a short poem about the sea."),
    ("code", "Write a Python function that checks whether a string is a palindrome, with a docstring "
             "and two examples."),
    ("extract", f"Read the passage and list every city it names, one per line.\n\n{_PASSAGE}"),
    ("summary", f"Summarise this passage in two sentences.\n\n{_PASSAGE}"),
    ("copy", f"Repeat this text exactly:\n\n{_PASSAGE}"),
    ("days", "List the days of the week, then list them again in reverse order."),
)


def run_generate(model: Path, prompt: str, max_new_tokens: int, draft_args: list[str],
                 metrics: Path) -> tuple[str, dict]:
    """One `ringllm generate` (resident, float32, cpu, chat, greedy): its completion and metrics."""
    from ringllm.cli import main as ringllm_main

    argv = ["generate", "--model", str(model), "--resident", "--device", "cpu", "--dtype", "float32",
            "--temperature", "0", "--max-new-tokens", str(max_new_tokens), "--prompt", prompt,
            "--metrics-json", str(metrics), *draft_args]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = ringllm_main(argv)
    if rc != 0:
        raise RingllmError(f"ringllm {shlex.join(argv)}: exit code {rc}")
    return out.getvalue(), json.loads(metrics.read_text())


def prepare_draft(spec: str, model: Path, drafts_dir: Path, log) -> dict:
    """A draft spec -> {name, args (for ringllm generate), pair (its exact description), dir}."""
    from ringllm.checkpoint.layout import load_layout

    target = load_layout(model)
    layers = target.config.num_layers
    if spec == "ngram":
        return {"name": "ngram", "args": ["--draft", "ngram"], "dir": None,
                "pair": "prompt lookup: the n-grams (n = 3 down to 1) of the prompt and output so far (--draft ngram)"}
    if spec == "fp8":
        path = drafts_dir / "fp8"
        if not (path / "config.json").is_file():
            from ringllm.convert import convert_to_fp8
            log(f"[spec_accept] building {path}: ringllm convert --to fp8 {model}")
            convert_to_fp8(model, path, progress=False)
        return {"name": "fp8", "args": ["--draft-model", str(path)], "dir": str(path),
                "pair": f"the target's own FP8 copy (ringllm convert --to fp8: e4m3 weights with a float32 scale "
                        f"per row in all {layers} layers; embeddings, norms and lm_head as in the target)"}
    keep = _layer_count(spec, layers)
    if keep is not None:
        path = drafts_dir / f"layers-{keep}"
        if not (path / "config.json").is_file():
            from ringllm.tools.make_draft import make_draft
            log(f"[spec_accept] building {path}: make_draft {model} --layers {keep}")
            make_draft(model, path, keep)
        if load_layout(path).config.num_layers != keep:
            raise RingllmError(f"{path}: holds a draft of {load_layout(path).config.num_layers} layers, not {keep}; "
                               "remove it or choose another --drafts-dir")
        return {"name": f"layers {keep}/{layers}", "args": ["--draft-model", str(path)], "dir": str(path),
                "pair": f"the target's first {keep} of {layers} decoder layers, then its final norm and its "
                        "embeddings/lm_head (tools/make_draft: an early exit, not trained for it)"}
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise RingllmError(f"--drafts {spec}: not ngram, fp8, a fraction A/B or count of layers, or a model "
                           "directory (no config.json there)")
    return {"name": path.name, "args": ["--draft-model", str(path)], "dir": str(path), "pair": f"the model at {path}"}


def check_draft_specs(specs: list[str], model: Path) -> None:
    """Every --drafts entry names a draft, before anything is created or built (one line if not)."""
    from ringllm.checkpoint.layout import load_layout

    layers = load_layout(model).config.num_layers
    for spec in specs:
        if spec not in ("ngram", "fp8") and _layer_count(spec, layers) is None \
                and not (Path(spec) / "config.json").is_file():
            raise RingllmError(f"--drafts {spec}: not ngram, fp8, a fraction A/B or count of layers, or a model "
                               "directory (no config.json there)")


def _layer_count(spec: str, layers: int) -> int | None:
    """`A/B` (a fraction of the target's layers, rounded, at least 1) or `N`: the draft's layers."""
    try:
        keep = max(1, round(Fraction(spec) * layers)) if "/" in spec else int(spec)
    except (ValueError, ZeroDivisionError):
        return None
    if not 1 <= keep < layers:
        raise RingllmError(f"--drafts {spec}: {keep} layers; a truncated draft keeps 1 to {layers - 1} of the "
                           f"target's {layers}")
    return keep


def spec_accept(model: Path, out: Path, drafts: list[dict], spec_tokens, prompts, max_new_tokens: int,
                log=print) -> dict:
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    runs, t_start = [], time.perf_counter()
    for name, prompt in prompts:
        t0 = time.perf_counter()
        reference, ref_metrics = run_generate(model, prompt, max_new_tokens, [], runs_dir / f"{name}-none.json")
        log(f"[spec_accept] {name}: no draft, {ref_metrics['new_tokens']} tokens ({time.perf_counter() - t0:.1f} s)")
        for draft in drafts:
            for k in spec_tokens:
                t0 = time.perf_counter()
                slug = f"{name}-{draft['name'].replace(' ', '').replace('/', 'of')}-k{k}"
                text, metrics = run_generate(model, prompt, max_new_tokens,
                                             [*draft["args"], "--spec-tokens", str(k)], runs_dir / f"{slug}.json")
                spec = metrics["speculation"]
                run = {"prompt": name, "draft": draft["name"], "spec_tokens": k, "identical": text == reference,
                       "new_tokens": metrics["new_tokens"], "seconds": metrics["seconds"],
                       **{key: spec[key] for key in ("passes", "tokens", "tokens_per_pass", "drafted", "accepted",
                                                     "acceptance", "branched", "draft_seconds_per_pass",
                                                     "verify_seconds_per_pass")}}
                if not run["identical"]:
                    run["output"], run["reference"] = text, reference
                runs.append(run)
                log(f"[spec_accept] {name}: {draft['name']} K={k}: {spec['tokens_per_pass']:.2f} tokens per pass, "
                    f"{spec['accepted']}/{spec['drafted']} accepted, "
                    f"{'identical' if run['identical'] else 'OUTPUT DIFFERS'} ({time.perf_counter() - t0:.1f} s)")
    return {"model": str(model), "engine": "resident, float32, cpu, chat template, greedy",
            "max_new_tokens": max_new_tokens, "prompts": [{"name": n, "text": p} for n, p in prompts],
            "drafts": [{k: d[k] for k in ("name", "pair", "dir")} for d in drafts], "spec_tokens": list(spec_tokens),
            "runs": runs, "failures": sum(not r["identical"] for r in runs),
            "wall_seconds": time.perf_counter() - t_start}


def run_in_parts(args, model: Path, drafts_dir: Path, names: list[str], log, timeout_s: float = 4 * 3600) -> dict:
    """--jobs N: N copies of this tool, prompts dealt round-robin, each into OUT/part-i; their
    reports joined in the prompts' order (the runs and verdicts are the parts' own)."""
    import subprocess

    parts = [names[i::args.jobs] for i in range(args.jobs) if names[i::args.jobs]]
    t_start, procs = time.perf_counter(), []
    for i, share in enumerate(parts):
        cmd = [sys.executable, "-m", "ringllm.tools.spec_accept", "--model", str(model), "--out",
               str(args.out / f"part-{i}"), "--drafts", args.drafts, "--drafts-dir", str(drafts_dir),
               "--spec-tokens", args.spec_tokens, "--prompts", ",".join(share),
               "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
    reports = []
    for i, proc in enumerate(procs):
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise RingllmError(f"--jobs: part {i} ran past {timeout_s:.0f} s") from None
        part = args.out / f"part-{i}" / "spec-accept.json"
        if rc not in (0, 1) or not part.is_file():      # 1: it ran, and an output differed
            raise RingllmError(f"--jobs: part {i} ({','.join(parts[i])}) failed with exit code {rc}")
        reports.append(json.loads(part.read_text()))
    merged = {**reports[0], "prompts": [p for n in names for r in reports for p in r["prompts"] if p["name"] == n],
              "runs": [run for n in names for r in reports for run in r["runs"] if run["prompt"] == n],
              "failures": sum(r["failures"] for r in reports), "wall_seconds": time.perf_counter() - t_start,
              "parts": [{"prompts": share, "out": str(args.out / f"part-{i}")} for i, share in enumerate(parts)]}
    for key in ("command", "date", "table", "pass_seconds", "threads"):
        merged.pop(key, None)
    log(f"[spec_accept] {len(parts)} parts joined")
    return merged


def rows(report: dict) -> list[dict]:
    """Per draft x K: tokens per pass and acceptance per prompt, their means, identical outputs."""
    names = [p["name"] for p in report["prompts"]]
    table = []
    for draft in report["drafts"]:
        for k in report["spec_tokens"]:
            runs = {r["prompt"]: r for r in report["runs"] if r["draft"] == draft["name"] and r["spec_tokens"] == k}
            tpp = [runs[n]["tokens_per_pass"] for n in names]
            acc = [runs[n]["acceptance"] or 0.0 for n in names]
            table.append({"draft": draft["name"], "spec_tokens": k, "tokens_per_pass": tpp, "acceptance": acc,
                          "mean_tokens_per_pass": sum(tpp) / len(tpp), "mean_acceptance": sum(acc) / len(acc),
                          "identical": sum(runs[n]["identical"] for n in names), "runs": len(names)})
    return table


def format_table(report: dict, pass_seconds: float | None = None) -> str:
    names = [p["name"] for p in report["prompts"]]
    table = rows(report)
    head = f"{'draft':<16}{'K':>3}" + "".join(f"{n[:8]:>9}" for n in names) + f"{'mean':>8}"
    lines = [f"{report['model']}: {report['engine']}, {report['max_new_tokens']} new tokens", "",
             "drafts:"] + [f"  {d['name']}: {d['pair']}" for d in report["drafts"]]
    for label, key, fmt in (("tokens per decode pass", "tokens_per_pass", "9.2f"),
                            ("acceptance (accepted / drafted tree nodes)", "acceptance", "9.0%")):
        extra = f"{'same':>6}" if key == "tokens_per_pass" else ""
        implied = key == "tokens_per_pass" and pass_seconds
        header = head + extra + (f"{'tok/s':>7}" if implied else "")
        lines += ["", label + ":", header, "-" * len(header)]
        for row in table:
            line = (f"{row['draft'][:15]:<16}{row['spec_tokens']:>3}" + "".join(format(v, fmt) for v in row[key])
                    + format(row["mean_" + key], fmt[:-3].replace("9", "8") + fmt[-3:]))
            if key == "tokens_per_pass":
                line += f"{row['identical']:>4}/{row['runs']}"
            if implied:
                line += f"{row['mean_tokens_per_pass'] / pass_seconds:7.2f}"
            lines.append(line)
    if pass_seconds:
        lines += ["", f"tok/s: the mean tokens per pass / {pass_seconds} s a pass (plain decoding: "
                      f"{1 / pass_seconds:.2f} tok/s); the draft's own time not counted"]
    lines += ["", "same: runs whose output equals the no-draft run's (greedy float32: must be all)"]
    if report["failures"]:
        lines.append(f"FAILURES: {report['failures']} runs' output differs from the no-draft output:")
        lines += [f"  {r['prompt']} {r['draft']} K={r['spec_tokens']}" for r in report["runs"] if not r["identical"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ringllm.tools.spec_accept", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="the target (default: the built-in SmolLM2-135M-Instruct)")
    ap.add_argument("--out", type=Path, required=True, help="directory for spec-accept.json, .txt and runs/")
    ap.add_argument("--drafts", default=",".join(DRAFTS),
                    help="comma-separated: ngram, fp8, a fraction A/B or count N of the layers, a model directory")
    ap.add_argument("--drafts-dir", type=Path, default=None, help="where built drafts go (default OUT/drafts)")
    ap.add_argument("--spec-tokens", default=",".join(map(str, SPEC_TOKENS)), help="comma-separated K values")
    ap.add_argument("--prompts", default=None, help="comma-separated prompt names (default: all: "
                                                    + ", ".join(n for n, _ in PROMPTS) + ")")
    ap.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a busy 2-core machine two spinning OpenMP threads made "
                         "a run 20x slower)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="processes, each running a share of the prompts (the drafts are built first)")
    ap.add_argument("--pass-seconds", type=float, default=None,
                    help="seconds of one verification pass elsewhere: adds tokens per pass / S as tok/s")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        spec_tokens = tuple(int(k) for k in args.spec_tokens.split(","))
    except ValueError:
        ap.error(f"--spec-tokens: comma-separated counts, got {args.spec_tokens!r}")
    if (min(spec_tokens) < 1 or args.max_new_tokens < 1 or args.threads < 1 or args.jobs < 1
            or (args.pass_seconds is not None and args.pass_seconds <= 0)):
        ap.error("--spec-tokens, --max-new-tokens, --threads and --jobs must be >= 1, --pass-seconds > 0")
    known = dict(PROMPTS)
    names = args.prompts.split(",") if args.prompts else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        ap.error(f"--prompts: unknown {unknown[0]!r} (known: {', '.join(known)})")
    from ringllm.workers.process_setup import configure_logging
    configure_logging("[ringllm] %(message)s", False)
    log = lambda m: print(m, file=sys.stderr, flush=True)   # noqa: E731
    try:
        import torch

        from ringllm.cli_input import default_cache_dir
        from ringllm.tools.demo_model import ensure_demo_model

        torch.set_num_threads(args.threads)   # every run of the tool computes in this process
        model = args.model if args.model is not None else ensure_demo_model(default_cache_dir())
        specs = [s for s in args.drafts.split(",") if s]
        check_draft_specs(specs, model)
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RingllmError(f"--out {args.out}: cannot create it ({err.strerror})") from None
        drafts_dir = args.drafts_dir or args.out / "drafts"
        drafts_dir.mkdir(parents=True, exist_ok=True)
        drafts = [prepare_draft(s, model, drafts_dir, log) for s in specs]
        if args.jobs > 1:
            report = run_in_parts(args, model, drafts_dir, names, log)
        else:
            report = spec_accept(model, args.out, drafts, spec_tokens, [(n, known[n]) for n in names],
                                 args.max_new_tokens, log)
    except RingllmError as err:
        print(f"ringllm: error: {err}", file=sys.stderr)
        return 1
    command = shlex.join([sys.executable, "-m", "ringllm.tools.spec_accept",
                          *(argv if argv is not None else sys.argv[1:])])
    report.update(command=command, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  pass_seconds=args.pass_seconds, threads=args.threads,
                  table=rows(report))
    from ringllm.tools.bench import save_report

    text = format_table(report, args.pass_seconds)
    save_report(args.out, "spec-accept", report, text)
    if report["failures"]:
        print(f"ringllm: error: {report['failures']} runs' output differs from the no-draft output "
              "(greedy float32 with a draft must be identical); see spec-accept.txt", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
