"""The `pathpatch` command line: one subcommand per verb, each a thin call into a module
(user-facing text: DESCRIPTION and EPILOG below)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pathpatch.errors import PathPatchError
from pipeline.allocator import fit_to_model, keep_freed_memory


def _cmd_evidence(args: argparse.Namespace) -> int:
    from pathpatch.tools.evidence import main as evidence_main

    return evidence_main(args.model)


def _apply_overrides(spec, args: argparse.Namespace):
    changes = {}
    if getattr(args, "workers", None) is not None:
        if args.workers < 1:
            raise PathPatchError(f"--workers {args.workers}: give at least 1")
        changes["workers"] = args.workers
    return spec.with_resources(**changes) if changes else spec


SCORES_LEGEND = (
    "proportion_explained = 1 - aue/ate: the share of the effect that the hypothesis's paths "
    "carry (1: all of it; may be negative; NULL when ate is ~0)\n"
    "pe_low, pe_high: its 95% confidence interval (delta method over the n pairs)\n"
    "aue, ate: mean unexplained effect delta(G(x_r), G_H) and total effect delta(G(x_r), "
    "G(x_c)) over the n (reference, counterfactual) pairs; delta = {metric}")


def _finish(outcome, folder: Path, quiet: bool) -> int:
    from pipeline.query import open_sweeps, query_text

    print(outcome.summary())
    if not quiet:
        con = open_sweeps(folder)
        attributed, evaluated = con.sql("SELECT (SELECT count(*) FROM items WHERE kind = "
                                        "'attribution'), (SELECT count(*) FROM items WHERE "
                                        "kind = 'evaluation')").fetchall()[0]
        if attributed:
            print(query_text(con, "SELECT method, rank, edge, importance, importance_low, "
                                  "importance_high FROM edge_scores WHERE rank <= 5 AND "
                                  "method <> 'exact' ORDER BY method, rank"))
            print("importance: each attribution method's mean score, oriented so that higher "
                  "means the edge matters more; every edge and the exact ranking: pathpatch sql "
                  f"{folder} \"SELECT * FROM edge_scores\"")
        if not evaluated:
            return _failed_items(outcome, folder)
        curves = _print_curve_scores(con, folder)
        others = ("" if not curves else " WHERE hypothesis NOT IN (SELECT hypothesis FROM "
                  "hypotheses WHERE family = 'circuit_curve')")
        if curves and not con.sql("SELECT count(*) FROM scores" + others).fetchall()[0][0]:
            return _failed_items(outcome, folder)  # a curve sweep: its headline is above
        print(query_text(con, "SELECT hypothesis, n, proportion_explained, pe_low, pe_high, "
                              "aue, ate" + (", partial" if outcome.failed else "") +
                              " FROM scores" + others + " ORDER BY proportion_explained DESC "
                              "NULLS LAST, hypothesis LIMIT 30"))
        print(SCORES_LEGEND.format(metric=outcome.metric or "delta"))
        print(f"more: pathpatch sql {folder} \"SELECT * FROM scores\"; per-example rows in "
              "the view results; a report: pathpatch report " + str(folder))
    return _failed_items(outcome, folder)


def _print_curve_scores(con, folder: Path) -> bool:
    """A curve sweep's headline: CPR and CMD per ranking with their 95% intervals and the
    rankings' agreement (as the report shows them); False where the sweep has no curve."""
    areas = con.sql("SELECT * FROM curve_scores ORDER BY ranking").to_arrow_table().to_pylist()
    if not areas:
        return False
    from pipeline.figures import curve_text  # matplotlib: only for a curve sweep

    agreement = [dict(zip(("method_a", "method_b", "n_edges", "spearman", "spearman_abs"), r,
                          strict=True))
                 for r in con.sql("SELECT method_a, method_b, n_edges, spearman, spearman_abs "
                                  "FROM ranking_agreement ORDER BY ALL").fetchall()]
    (n,), = con.sql("SELECT max(n) FROM faithfulness").fetchall()
    print("\n".join(curve_text(areas, agreement)))
    print(f"CPR: area under the faithfulness f(C) of the circuits kept by signed score; CMD: "
          f"area of |1 - f| by |score| (MIB's; intervals: paired bootstrap over the {n} pairs). "
          f"Each point: pathpatch sql {folder} \"SELECT * FROM faithfulness\"; curves, "
          f"circuit and agreement drawn: pathpatch report {folder}")
    return True


def _failed_items(outcome, folder: Path) -> int:
    """Exit status 1 with what to do when some work items failed every attempt, else 0."""
    if outcome.failed:
        print(f"partial: the scores above cover {outcome.total - outcome.failed} of "
              f"{outcome.total} work items", file=sys.stderr)
        print(f"error: {outcome.failed} work item(s) failed every attempt; see "
              f"`pathpatch status {folder}` for their errors, fix the cause and run "
              f"`pathpatch resume {folder}`", file=sys.stderr)
        return EXIT_ITEMS_FAILED
    return EXIT_OK


def _describe_search(resolved) -> str:
    from pathpatch.model.graph import Graph

    search = resolved.spec.search
    graph = Graph.from_model(resolved.model)
    return (f"search: ACDC's greedy rule over {len(graph.edges):,} edges, tau = {search.tau:g}, "
            f"metric {resolved.plan.metric}, {search.window} candidates per round, on "
            f"{resolved.plan.n_examples} examples in {len(resolved.shards)} shards: at most one "
            "evaluation per edge, run as work items (one group of candidates per shard)")


def _finish_search(outcome, folder: Path, quiet: bool) -> int:
    from pipeline.query import run_query

    print(outcome.summary())
    if not quiet:
        print(run_query([folder], "SELECT edge, before, after, after - before AS rise FROM "
                                  "search_steps WHERE NOT removed ORDER BY index"))
        print("the circuit's edges, each with the mean metric before and after leaving it out "
              f"(kept: rise >= tau); every decision: pathpatch sql {folder} "
              "\"SELECT * FROM search_steps ORDER BY index\"")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.spec import load_spec
    from pipeline.store import SweepFolder

    spec = _apply_overrides(load_spec(args.spec), args)  # before the heavy imports: fast errors
    out = Path(args.out) if args.out else Path("sweeps") / spec.name
    if not args.dry_run:
        SweepFolder(out).check_target(None)  # a file, unwritable, someone else's: say so now

    from pipeline.plan import describe
    from pipeline.progress import Phases
    from pipeline.resolve import RESOLVE_PHASES, resolve
    from pipeline.sweep import run_sweep

    phases = Phases(RESOLVE_PHASES, "preparing", only_on_terminal=True)
    try:
        resolved = resolve(spec, progress=phases, weights=not args.dry_run)
    finally:
        phases.close()
    for warning in resolved.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print(describe(resolved.plan) if spec.search is None else _describe_search(resolved))
        print("dry run: nothing was written and no cluster was started")
        return 0
    if spec.search is not None:
        from pipeline.search import run_search

        outcome = run_search(spec, out, backend=args.backend, address=args.address,
                             progress=not args.no_progress, resolved=resolved,
                             spec_file=str(Path(args.spec).resolve()), force=args.force)
        return _finish_search(outcome, out, args.quiet)
    outcome = run_sweep(spec, out, backend=args.backend, address=args.address,
                        progress=not args.no_progress, resolved=resolved,
                        spec_file=str(Path(args.spec).resolve()), force=args.force)
    return _finish(outcome, out, args.quiet)


def _cmd_resume(args: argparse.Namespace) -> int:
    from pipeline.store import SweepFolder

    SweepFolder(args.folder).read_manifest()  # not a sweep folder: say so before heavy imports
    from pipeline.sweep import load_sweep_spec, run_sweep

    spec = _apply_overrides(load_sweep_spec(args.folder), args)
    if spec.search is not None:
        from pipeline.search import run_search

        outcome = run_search(spec, args.folder, backend=args.backend, address=args.address,
                             progress=not args.no_progress, force=args.force)
        return _finish_search(outcome, Path(args.folder), args.quiet)
    outcome = run_sweep(spec, args.folder, backend=args.backend, address=args.address,
                        progress=not args.no_progress, force=args.force)
    return _finish(outcome, Path(args.folder), args.quiet)


def _cmd_status(args: argparse.Namespace) -> int:
    from pipeline.store import SweepFolder, item_status, summarize_status

    folder = SweepFolder(args.folder)
    manifest = folder.read_manifest()
    summary = summarize_status(item_status(folder, manifest), by=args.by)
    summary = {"sweep": str(folder.root), "name": manifest["name"], **summary}
    if "search" in manifest:  # a search: its plan grows round by round, its steps say how far
        import pyarrow.parquet as pq

        steps = sorted(folder.steps_dir.glob("*.parquet")) if folder.steps_dir.is_dir() else []
        decided = 0
        for f in steps:
            try:
                decided += pq.read_metadata(f).num_rows
            except (OSError, ValueError) as err:  # Arrow's errors are both
                raise PathPatchError(f"{f}: unreadable steps file ({err}); run the search's "
                                     "spec again: it rewrites every steps file") from None
        summary["search"] = {**manifest["search"], "decided": decided,
                             "finished": "circuit_edges" in manifest["search"],
                             "evaluations_written": len(list(folder.items_dir.glob("*.parquet")))
                             if folder.items_dir.is_dir() else 0}
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"{summary['name']} ({folder.root}): {summary['done']} done, {summary['failed']} "
          f"failed, {summary['pending']} pending of {summary['total']} work items")
    for key in ("by_hypothesis", "by_shard"):
        if key in summary:
            label = key.removeprefix("by_")
            width = max([len(label)] + [len(k) for k in summary[key]])
            print(f"{label:<{width}}  done  failed  pending  total")
            for name, c in summary[key].items():
                print(f"{name:<{width}}  {c['done']:>4}  {c['failed']:>6}  {c['pending']:>7}  "
                      f"{c['total']:>5}")
    if "search" in summary:
        search = summary["search"]
        state = (f"finished: circuit of {search['circuit_edges']} edges" if search["finished"]
                 else "not finished: run the same spec again (or `pathpatch resume`) to go on")
        print(f"search (tau = {search['tau']:g}): {search['decided']} edges decided, "
              f"{search['evaluations_written']} work items written; {state}")
    for f in summary["failures"]:
        print(f"failed {f['item']} after {f['attempts']} attempts: {f['error']}")
    if folder.failed_dir.is_dir() and "search" in summary and not summary["search"]["finished"]:
        for path in sorted(folder.failed_dir.glob("*.json")):
            record = json.loads(path.read_text())
            print(f"failed {path.stem} after {record.get('attempts')} attempts: "
                  f"{record.get('error')}")
    return 0


def _cmd_sql(args: argparse.Namespace) -> int:
    from pipeline.query import VIEWS, run_query

    if len(args.args) < 2:
        raise PathPatchError("usage: pathpatch sql DIR [DIR ...] \"SELECT ...\" (views: "
                             f"{', '.join(VIEWS)})")
    *folders, query = args.args
    print(run_query(folders, query, args.format))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """The default sweep (jobs/default.toml) into sweeps/default, on a local Ray."""
    default = Path(__file__).resolve().parent.parent / "jobs" / "default.toml"
    if not default.is_file():
        raise PathPatchError(f"{default} is missing: the demo runs from a source checkout")
    status = _cmd_run(argparse.Namespace(
        spec=str(default), out=args.out, dry_run=False, address=args.address, workers=None,
        backend="ray", no_progress=False, quiet=False, force=False))
    _cmd_report(argparse.Namespace(folder=args.out))
    return status


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "engine":
        from pathpatch.tools.engine_benchmarks import (
            BENCH_PHASES,
            BENCH_SETTINGS,
            SHAPES,
            run_engine_benchmark,
            shaped,
        )
        from pipeline.progress import Phases

        if args.shape not in SHAPES:
            raise PathPatchError(f"--shape {args.shape!r}: the shapes are {', '.join(SHAPES)}")
        settings = dict(BENCH_SETTINGS[args.shape])
        for key, value in (("n_hypotheses", args.hypotheses), ("repeats", args.repeats),
                           ("memory_budget", args.memory_budget)):
            if value is not None:
                settings[key] = value
        if args.model != "gpt2-small-shape":
            from pathpatch.model.loading import load_model

            model = load_model(args.model)
        else:
            model = shaped(args.shape)
        keeps_freed_memory = fit_to_model(model, settings["memory_budget"])
        phases = Phases(BENCH_PHASES, "bench engine")
        try:
            result = run_engine_benchmark(model, progress=phases, **settings)
            result["shape"] = args.shape if args.model == "gpt2-small-shape" else args.model
        finally:
            phases.close()
        result["allocator_keeps_freed_memory"] = keeps_freed_memory
    elif args.what == "discovery":
        from pathpatch.tools.engine_benchmarks import (
            DISCOVERY_PHASES,
            SHAPES,
            run_discovery_benchmark,
            shaped,
        )
        from pipeline.progress import Phases

        if args.shape not in SHAPES:
            raise PathPatchError(f"--shape {args.shape!r}: the shapes are {', '.join(SHAPES)}")
        phases = Phases(DISCOVERY_PHASES, "bench discovery")
        try:
            result = run_discovery_benchmark(shaped(args.shape), steps=args.steps,
                                             decisions=args.decisions, repeats=args.repeats or 2,
                                             progress=phases)
            result["shape"] = args.shape
        finally:
            phases.close()
    elif args.what == "plan":
        from pipeline.plan_benchmark import PLAN_SHAPES, bench_plan

        result = bench_plan(tuple(args.plan_shapes) if args.plan_shapes else PLAN_SHAPES,
                            pairs=args.pairs or 64)
    elif args.what == "scan":
        from pipeline.pipeline_benchmark import SCAN_PHASES, bench_scan
        from pipeline.progress import Phases

        phases = Phases(SCAN_PHASES, "bench scan")
        try:
            result = bench_scan(pairs=args.pairs or 16, sample_items=args.sample_items, keep=args.keep,
                                progress=phases, device=args.device,
                                memory_budget=args.memory_budget)
        finally:
            phases.close()
    elif args.what == "driver":
        from pipeline.pipeline_benchmark import DRIVER_PHASES, bench_driver
        from pipeline.progress import Phases

        phases = Phases(DRIVER_PHASES, "bench driver")
        try:
            result = bench_driver(items=args.items, rate=args.rate, keep=args.keep,
                                  progress=phases)
        finally:
            phases.close()
    else:
        from pipeline.pipeline_benchmark import bench_phases, bench_pipeline
        from pipeline.progress import Phases

        phases = Phases(bench_phases(), "bench pipeline")
        try:
            result = bench_pipeline(args.spec, keep=args.keep, progress=phases)
        finally:
            phases.close()
    print(json.dumps(result, indent=1))
    return 0


def _cmd_graph(args: argparse.Namespace) -> int:
    from pathpatch.model.graph import Graph, describe
    from pathpatch.model.sources import read_config

    cfg = read_config(args.model)  # the config alone: no weights, and no torch for most forms
    print(describe(Graph.from_config(cfg), edges=args.edges))
    print(cfg.describe())
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from pathpatch.language.hypotheses import Hypothesis
    from pathpatch.model.sources import read_config
    from pathpatch.tools.explain import explain

    cfg = read_config(args.model)  # the config alone: no weights, and no torch for most forms
    dataset = None
    if args.dataset and Path(args.dataset).suffix == ".parquet":
        from pathpatch.data.pairs import load_parquet

        dataset = load_parquet(args.dataset, vocab_size=int(cfg.d_vocab))
    elif args.dataset:
        from pathpatch.data.tasks import make_dataset

        dataset = make_dataset(args.dataset, n=1)
    print(explain(cfg, Hypothesis(args.name, args.pattern), seq_len=args.seq_len, dataset=dataset))
    return 0


def _cmd_curve(args: argparse.Namespace) -> int:
    """A finished scan's rankings (and searches' circuits) -> their curves' spec -> run it."""
    from pipeline.curve import write_curve_spec

    spec, rankings = write_curve_spec(args.scan, fractions=args.fractions,
                                      searches=args.search or ())
    print(f"rankings {', '.join(map(str, rankings))}; spec {spec}")
    return _cmd_run(argparse.Namespace(**{**vars(args), "spec": str(spec)}))


def _cmd_circuit(args: argparse.Namespace) -> int:
    """A ranking's top-k circuit as an EAP-IG / MIB graph JSON (for MIB submissions)."""
    import math

    from pathpatch.language.circuits import Ranking, prune, write_eap_json
    from pathpatch.model.graph import Graph
    from pathpatch.model.sources import read_config

    if not 0 < args.fraction <= 1:
        raise PathPatchError(f"--fraction {args.fraction!r}: give a fraction of edges in (0, 1]")
    cfg = read_config(args.model)  # the config alone: no weights, and no torch for most forms
    graph = Graph.from_config(cfg)
    ranking = Ranking.load(graph, args.ranking)
    n = math.floor(args.fraction * len(graph.edges))
    kept = prune(graph, ranking.top(n, absolute=args.absolute))
    out = Path(args.out).resolve()
    write_eap_json(graph, out, ranking.scores, kept, d_model=cfg.d_model)
    print(f"wrote {out}: {len(kept):,} edges in the circuit ({n:,} ranked by "
          f"{'absolute' if args.absolute else 'signed'} score, then pruned), "
          f"{len(graph.edges):,} scored")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import write_report

    png, page = write_report(args.folder)
    print(f"report: {page} (figure: {png})")
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a "
                                     "local cluster started for this run)")
    p.add_argument("--workers", type=int, help="override resources.workers")
    p.add_argument("--backend", choices=("ray", "inprocess"), default="ray",
                   help="inprocess: no Ray, one item after another (debugging)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    p.add_argument("--force", action="store_true",
                   help="write into a folder that holds a sweep of another name, model, metric "
                        "or dtype (its result files are kept in superseded/, out of the views)")


TASKS = ("induction", "modular_sum", "gpt2_numbers", "ioi")
"""The generated tasks' names (`pathpatch.data.tasks.DATASETS`, tested), for help texts that
must not import torch."""

DESCRIPTION = """\
Path patching sweeps (Goldowsky-Dill et al. 2023): test where a model's behaviour lives by
running many hypotheses (sets of paths through the model) over a dataset of (reference,
counterfactual) pairs on a Ray cluster, then query the scores with SQL."""
EPILOG = """\
first steps:
  pathpatch demo                                    the default sweep on the bundled model
  pathpatch run jobs/induction_refinement.toml --dry-run
  pathpatch sql sweeps/default "SELECT * FROM scores ORDER BY proportion_explained DESC"

exit status: 0 done; 1 some work items failed (the rest is written); 2 bad input or an
environment problem (nothing written or lost); 130 interrupted (resume finishes it).
docs: README.md, docs/PIPELINE.md (specs, folders, SQL), docs/PATTERNS.md (hypotheses)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathpatch", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "evidence",
        help="show that a model does its task: induction heads (attn-only-2l, or any model spec); "
        "MLPs that matter (mlp-2l)",
    )
    p.add_argument("model", nargs="?", default="attn-only-2l", help="model spec (default: attn-only-2l)")
    p.set_defaults(func=_cmd_evidence)

    p = sub.add_parser("run", help="run (or resume) a sweep spec into a sweep folder")
    p.add_argument("spec", help="sweep spec (TOML), e.g. jobs/default.toml")
    p.add_argument("--out", help="sweep folder (default: sweeps/<spec name>)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the plan; write nothing, start no cluster")
    _add_run_options(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("resume", help="finish a sweep folder with the spec it was run with")
    p.add_argument("folder", help="the sweep folder (e.g. sweeps/default)")
    _add_run_options(p)
    p.set_defaults(func=_cmd_resume)

    p = sub.add_parser("status", help="done / failed / pending work items of a sweep folder")
    p.add_argument("folder", help="the sweep folder (e.g. sweeps/default)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--by", choices=("hypothesis", "shard"), help="break counts down")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("sql", help="read-only SQL over sweep folders (views results, scores, "
                                   "items, hypotheses, curve_scores, edge_scores, ...: "
                                   "\"SHOW TABLES\" lists them, docs/PIPELINE.md says what "
                                   "each holds)")
    p.add_argument("args", nargs="+", metavar="DIR... QUERY",
                   help="one or more sweep folders, then the query")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table",
                   help="output format (default: table)")
    p.set_defaults(func=_cmd_sql)

    p = sub.add_parser("demo", help="run the default induction sweep (jobs/default.toml)")
    p.add_argument("--out", default="sweeps/default", help="sweep folder (default: sweeps/default)")
    p.add_argument("--address", help="Ray cluster address (default: a local cluster)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="benchmarks: engine (per-hypothesis cost), pipeline (Ray), "
                                     "scan (the full single-edge scan of a GPT-2-small shape), "
                                     "discovery (EAP, EAP-IG and the greedy search in forwards), "
                                     "plan (a full scan planned from the architecture alone), "
                                     "driver (the driver loop on stand-in workers, and a resume)")
    p.add_argument("what", choices=("engine", "pipeline", "scan", "discovery", "plan", "driver"))
    p.add_argument("--plan-shapes", nargs="+", default=None, metavar="SHAPE",
                   help="plan: shapes whose full single-edge scan is planned from config.json "
                        "alone (default: qwen2.5-0.5b gemma-2-2b llama-3.1-8b; also gpt2-small)")
    p.add_argument("--items", type=int, default=10_000,
                   help="driver: work items of 512 rows each (a multiple of 25)")
    p.add_argument("--rate", type=float, default=None,
                   help="driver: items per second the stand-in workers return (default: unlimited)")
    p.add_argument("--steps", type=int, default=5, help="discovery: EAP-IG's points")
    p.add_argument("--decisions", type=int, default=24,
                   help="discovery: search decisions to time (edges into out, the first visited)")
    p.add_argument("--pairs", type=int, default=None,
                   help="scan: dataset pairs (32 tokens each, default 16); plan: induction pairs "
                        "(default 64)")
    p.add_argument("--sample-items", type=int, default=3,
                   help="scan: items (64 edge removals each) run through the pipeline")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="scan: cpu (in this process, one thread) or cuda (one Ray actor, one GPU)")
    p.add_argument("--memory-budget", type=int, default=None,
                   help="engine, scan: bytes per engine call (default: the engine's 2 GiB; "
                        "engine: the shape's, 6 GiB for qwen2.5-0.5b and llama-3.2-1b)")
    p.add_argument("--spec", default=None, help="pipeline: sweep to time (default: jobs/bench.toml)")
    p.add_argument("--keep", default=None,
                   help="pipeline, scan, driver: keep the sweep folders (and scan's model) under "
                        "this folder")
    p.add_argument("--model", default="gpt2-small-shape",
                   help="engine: a model to load (attn-only-2l, a directory...) instead of --shape")
    p.add_argument("--shape", default="gpt2-small",
                   help="engine, discovery: a random-weight model shaped like gpt2-small (default), "
                        "pythia-160m, qwen2.5-0.5b or llama-3.2-1b")
    p.add_argument("--hypotheses", type=int, default=None,
                   help="engine: hypotheses per family, the same for every family (default: the "
                        "shape's, 64 for gpt2-small and pythia-160m, 16 for qwen2.5-0.5b; "
                        "llama-3.2-1b: 4 circuits, 16 edge removals, 8 induction members)")
    p.add_argument("--repeats", type=int, default=None,
                   help="engine, discovery: timed runs, the best counts (default: 2; engine: "
                        "1 for llama-3.2-1b)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("graph", help="nodes, edges and number of paths of a model")
    p.add_argument("model", help="bundled name, TransformerLens name, HF directory or checkpoint")
    p.add_argument("--edges", action="store_true", help="list every edge")
    p.set_defaults(func=_cmd_graph)

    p = sub.add_parser("explain", help="what a pattern means on a model: |P|, sample paths, copies")
    p.add_argument("model", help="bundled name, TransformerLens name, HF directory or checkpoint")
    p.add_argument("pattern", help='e.g. "in -> a1.*[v] -> out" (grammar: docs/PATTERNS.md)')
    p.add_argument("--name", default="pattern", help="label printed with the result")
    p.add_argument("--seq-len", type=int, default=8, help="positions to count paths over")
    p.add_argument("--dataset", help="whose first example supplies the @mask= masks: a task "
                   f"({', '.join(TASKS)}) or your own pairs (a .parquet file, README "
                   "\"Your own pairs\")")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("curve", help="faithfulness curves of a finished scan's rankings (exact "
                       "edge removals, [[attributions]]) and of searches' circuits: writes the "
                       "rankings and the curves' spec beside the scan, then runs it")
    p.add_argument("scan", help="sweep folder of an edge scan (e.g. sweeps/edge_effects)")
    p.add_argument("--search", nargs="+", help="search folders whose circuits to add as rankings")
    p.add_argument("--fractions", type=float, nargs="+", help="fractions of edges (default MIB's)")
    p.add_argument("--out", help="the curve's sweep folder (default sweeps/<scan>-curve)")
    p.add_argument("--dry-run", action="store_true", help="write the spec, validate and plan only")
    _add_run_options(p)
    p.set_defaults(func=_cmd_curve)

    p = sub.add_parser("circuit", help="a ranking's top edges as an EAP-IG / MIB graph JSON")
    p.add_argument("ranking", help="Parquet/CSV (edge, score) table or EAP-IG graph (.json/.pt)")
    p.add_argument("--model", required=True, help="the model the ranking scores")
    p.add_argument("--fraction", type=float, default=0.1, help="share of edges kept before pruning")
    p.add_argument("--absolute", action="store_true", help="rank by |score| (MIB's CMD ranking)")
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.set_defaults(func=_cmd_circuit)

    p = sub.add_parser("report", help="write report.png and report.html into a sweep folder")
    p.add_argument("folder", help="the sweep folder (e.g. sweeps/default)")
    p.set_defaults(func=_cmd_report)
    return parser


EXIT_OK, EXIT_ITEMS_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
"""Exit statuses: 1 = some work items failed every attempt (the rest is written); 2 = bad input
or an environment problem, reported before anything was written or lost; 130 = Ctrl-C."""


def _sweep_being_run(args: argparse.Namespace) -> str | None:
    """The folder `run`, `resume` or `demo` writes into (for the message after Ctrl-C)."""
    if args.command not in ("run", "resume", "demo") or getattr(args, "dry_run", False):
        return None
    folder = getattr(args, "folder", None) or getattr(args, "out", None)
    if folder is None:
        from pipeline.spec import load_spec

        try:
            folder = str(Path("sweeps") / load_spec(args.spec).name)
        except PathPatchError:
            return None
    return folder


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        return int(args.func(args) or 0)
    except PathPatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        folder = _sweep_being_run(args)
        resume = f"; `pathpatch resume {folder}` finishes it" if folder else ""
        print(f"\ninterrupted: every result written so far is kept{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `pathpatch sql ... | head`: the reader left; not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- silence the flush at exit
        return 0
    except OSError as err:  # the environment, not the input: a full disk, permissions
        if os.environ.get("PATHPATCH_TRACEBACK"):
            raise
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where} (PATHPATCH_TRACEBACK=1 shows where)",
              file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
