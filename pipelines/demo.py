"""`mmcorpus demo`: the whole pipeline on the bundled real sample data with the DirectRunner.

Three inputs, all in data/sample/ (see its ATTRIBUTION.md):
  photos  26 CC BY / public-domain photos downloaded by the real img2dataset from a local server
          (webdataset shards + status parquet, 2 failed downloads included):
          filter → dedup → rewrite → pack (Parquet and WebDataset) → export for MiniCPM-V fine-tuning
  cc3m    8,000 Conceptual Captions validation captions (metadata pass, no images): filter → dedup
  coco-cn 2,000 COCO-CN human-written Chinese captions (metadata pass): filter → dedup → rewrite
          (Chinese prompt; the offline template answers in Chinese too)
  laion   1,000 LAION-style alt-texts from img2dataset's test set (metadata pass): filter → dedup

Then a three-stage curriculum from those four (data/mix/demo_mix.toml): ``synthdoc`` renders 4
document pages and the OCR stage reads them (stage 3's OCR data); ``select --stage 1|2|3`` draws
each stage's mixture (stage 2 disjoint from stage 1, stage 3 with the OCR pages, upsampled) and
``pack --stage N`` packs each with its stage profile; the demo prints pairs, tokens and shares per stage.

The rewrite stage uses the offline template backend by default (no model, deterministic; the
ledger's ``model`` column says ``offline-template``). ``--endpoint URL --model NAME`` runs it against
a real OpenAI-compatible server instead (``make demo-vllm`` starts a local vLLM for that).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time
import tomllib

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from schemas.errors import UserError
from transforms.stage_io import read_manifest

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / "data" / "sample"
DEMO_OCR_PAGES = 4  # synthetic pages OCR'd for stage 3: about 3 s each on a busy core
PROFILES = {1: "224 px", 2: "448 px", 3: "adaptive, sliced"}

import sys

# Logs of `make demo` are read in CI and pipes too: keep tables readable there.
console = Console(width=None if sys.stdout.isatty() else 132)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmcorpus demo", description=__doc__.splitlines()[0])
    p.add_argument("--output", default="build/demo", help="where the demo writes (default build/demo)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the bundled sample data directory")
    p.add_argument("--endpoint", help="OpenAI-compatible endpoint for the rewrite stage (default: offline template)")
    p.add_argument("--model", help="served model name at --endpoint")
    p.add_argument("--seq-len", type=int, default=2048, help="packed sequence length (default 2048)")
    p.add_argument("--stage-profile", type=int, default=3, choices=(1, 2, 3), help="MiniCPM-V pretraining stage (default 3)")
    p.add_argument("--force", action="store_true", help="rerun every stage even if its output is up to date")
    return p


def _stage(name: str, module_main, argv: list[str], timings: list) -> None:
    t0 = time.monotonic()
    console.rule(f"[bold]{escape(name)}")
    rc = module_main(argv)
    if rc:
        raise UserError(f"demo step {name} failed with exit code {rc}")
    timings.append((name, time.monotonic() - t0))


def curriculum_steps(out: pathlib.Path, seq_len: int, force: list[str]) -> list[tuple]:
    """The three-stage curriculum over the demo's per-source outputs (names as in demo_mix.toml)."""
    from pipelines import curriculum, ocr, pack, select_stage, synthdoc

    cur = out / "curriculum"
    with open(REPO / "data" / "mix" / "demo_mix.toml", "rb") as f:
        mix = curriculum.run_mix(tomllib.load(f), {2: str(cur / "select1"), 3: str(cur / "select2")})
    config = curriculum.write_toml(mix, str(cur / "mix.toml"))
    pool = ["--input", f"cc3m={out / 'cc3m' / 'dedup'}", "--input", f"cococn={out / 'coco-cn' / 'rewrite'}",
            "--input", f"laion={out / 'laion' / 'dedup'}", "--input", f"photos={out / 'photos' / 'rewrite'}"]
    steps = [
        ("curriculum/synthdoc", synthdoc.main, ["--output", str(cur / "synthdoc"), "--n", str(DEMO_OCR_PAGES),
                                                "--lang", "en,zh", "--seed", "7", *force]),
        ("curriculum/ocr", ocr.main, ["--input", str(cur / "synthdoc"), "--output", str(cur / "ocr"), "--no-safety", *force]),
    ]
    for n in (1, 2, 3):
        inputs = pool + (["--input", f"synthdoc={cur / 'ocr'}"] if n == 3 else [])
        steps.append((f"curriculum/select{n}", select_stage.main,
                      [*inputs, "--stage", str(n), "--config", config, "--output", str(cur / f"select{n}"), *force]))
    for n in (1, 2, 3):
        steps.append((f"curriculum/pack{n}", pack.main, ["--input", str(cur / f"select{n}"), "--output", str(cur / f"pack{n}"),
                                                         "--stage", str(n), "--seq-len", str(seq_len), "--format", "parquet",
                                                         *force]))
    return steps


def curriculum_table(out: pathlib.Path) -> Table:
    """What the curriculum holds per stage: pairs, replicas, tokens, packs, shares by source and language."""
    from pipelines.curriculum import stage_summary

    t = Table(title="three-stage curriculum (select → pack per stage)", title_justify="left")
    for col, just in (("stage", "left"), ("profile", "left"), ("pairs", "right"), ("replicas", "right"),
                      ("vs earlier", "right"), ("tokens", "right"), ("packs", "right"), ("fill", "right"),
                      ("by source", "left"), ("by language", "left")):
        t.add_column(col, justify=just)
    cur = out / "curriculum"
    for n in (1, 2, 3):
        s = stage_summary(str(cur / f"select{n}"), str(cur / f"pack{n}"))
        overlap = "" if s["overlap"] is None else f"{s['overlap']} shared"

        def shares(d: dict) -> str:
            return ", ".join(f"{k} {v:g}%" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))

        t.add_row(f"{n}", PROFILES[n], f"{s['pairs']:,} / {s['target_pairs']:,}", f"{s['replicas']:,}", overlap,
                  f"{s['tokens']:,}", f"{s['packs']:,}", f"{s['fill']:.1%}", escape(shares(s["by_dataset"])),
                  escape(shares(s["by_lang"])))
    return t


def run(args: argparse.Namespace) -> int:
    from pipelines import dedup, export, filter as filter_stage, pack, rewrite, verify

    data = pathlib.Path(args.data)
    out = pathlib.Path(args.output)
    if not (data / "i2d_webdataset").is_dir():
        raise UserError(f"{data} does not hold the bundled sample data (expected {data}/i2d_webdataset)")
    force = ["--force"] if args.force else []
    if args.endpoint and not args.model:
        raise UserError("--endpoint needs --model (the served model name)")
    rewrite_backend = (
        ["--backend", "openai", "--endpoint", args.endpoint, "--model", args.model]
        if args.endpoint
        else ["--backend", "offline-template"]
    )
    os.environ.setdefault("MMCORPUS_PROGRESS", "0")  # step lines below are the progress here
    timings: list[tuple[str, float]] = []
    photos = out / "photos"
    steps = [
        ("photos/filter", filter_stage.main, ["--input", str(data / "i2d_webdataset"), "--output", str(photos / "filter"), *force]),
        ("photos/dedup", dedup.main, ["--input", str(photos / "filter"), "--output", str(photos / "dedup"), *force]),
        ("photos/rewrite", rewrite.main, ["--input", str(photos / "dedup"), "--output", str(photos / "rewrite"),
                                          "--policy", "all", *rewrite_backend, *force]),
        ("photos/pack", pack.main, ["--input", str(photos / "rewrite"), "--output", str(photos / "pack"),
                                    "--stage", str(args.stage_profile), "--seq-len", str(args.seq_len),
                                    "--format", "parquet", *force]),
        ("photos/pack-wds", pack.main, ["--input", str(photos / "rewrite"), "--output", str(photos / "pack-wds"),
                                        "--stage", str(args.stage_profile), "--seq-len", str(args.seq_len),
                                        "--format", "webdataset", *force]),
        ("cc3m/filter", filter_stage.main, ["--input", str(data / "cc3m_val_captions_8k.tsv"), "--caption-col", "0",
                                            "--url-col", "1", "--output", str(out / "cc3m" / "filter"), *force]),
        ("cc3m/dedup", dedup.main, ["--input", str(out / "cc3m" / "filter"), "--output", str(out / "cc3m" / "dedup"), *force]),
        # The Chinese sample next to the English ones (issue 11): same stages, same defaults.
        ("coco-cn/filter", filter_stage.main, ["--input", str(data / "coco_cn_captions_2k.tsv"), "--caption-col", "1",
                                               "--url-col", "0", "--header", "no", "--output", str(out / "coco-cn" / "filter"),
                                               *force]),
        ("coco-cn/dedup", dedup.main, ["--input", str(out / "coco-cn" / "filter"), "--output", str(out / "coco-cn" / "dedup"),
                                       *force]),
        ("coco-cn/rewrite", rewrite.main, ["--input", str(out / "coco-cn" / "dedup"), "--output", str(out / "coco-cn" / "rewrite"),
                                           "--policy", "all", *rewrite_backend, *force]),
        ("laion/filter", filter_stage.main, ["--input", str(data / "img2dataset_sample_1000.parquet"), "--caption-col", "TEXT",
                                             "--url-col", "URL", "--output", str(out / "laion" / "filter"), *force]),
        ("laion/dedup", dedup.main, ["--input", str(out / "laion" / "filter"), "--output", str(out / "laion" / "dedup"), *force]),
    ]
    steps += curriculum_steps(out, args.seq_len, force)
    for name, fn, argv in steps:
        _stage(name, fn, argv, timings)
    console.rule("[bold]photos/export minicpmv")
    export.main(["minicpmv", "--input", str(photos / "rewrite"), "--output", str(photos / "export-minicpmv")])

    # verify every stage output
    failed = []
    for name, _, argv in steps:
        stage_dir = argv[argv.index("--output") + 1]
        if not all(ch.ok for ch in verify.verify(stage_dir)):
            failed.append(stage_dir)

    console.rule("[bold]what the demo built")
    console.print(summary_table(steps, dict(timings)))
    console.print(curriculum_table(out))
    console.rule("[bold]one decoded pack (photos/pack, pack 0)")
    console.print(escape(pack.render_pack(str(photos / "pack"), 0)))
    console.print(
        f"\nOutputs are in [bold]{escape(str(out))}[/bold]. Look inside with:\n"
        f"  mmcorpus inspect {out}/photos/pack\n"
        f"  mmcorpus inspect {out}/curriculum/select3   (target vs achieved per source, overlap)\n"
        f"  mmcorpus inspect {out}/photos/rewrite --samples 3\n"
        f"  mmcorpus stats {out}/photos --plot {out}/photos.png\n"
        f"  mmcorpus verify {out}/photos/filter"
    )
    if failed:
        console.print(f"[red]verify failed for: {', '.join(failed)}[/red]")
    else:
        console.print("[green]verify: every stage output passed its invariants and checksums[/green]")
    write_demo_report(out, data)
    return 1 if failed else 0


def write_demo_report(out: pathlib.Path, data: pathlib.Path) -> None:
    """The demo's last step: one static HTML report of every run it wrote (``mmcorpus report``)."""
    from pipelines import report

    console.rule("[bold]report")
    raw = tuple(str(p) for p in (data / "i2d_webdataset", data / "img2dataset_sample_1000.parquet") if p.exists())
    res = report.write_report(str(out), str(out / "report"), report.ReportConfig(raw_inputs=raw))
    console.print(f"report of {', '.join(res['runs'])}: {res['thumbnails']} thumbnails, {res['traced_keys']} traced keys.\n"
                  f"Open it: [bold]{escape(os.path.abspath(res['index']))}[/bold]\n"
                  f"(or share it: python -m http.server -d {escape(str(out / 'report'))})")


def summary_table(steps, seconds: dict[str, float]) -> Table:
    t = Table(title="stages (all verified: inputs = ledger rows, kept = outputs, checksums)", title_justify="left")
    for col, just in (("step", "left"), ("in", "right"), ("kept", "right"), ("rejected", "right"),
                      ("duplicate", "right"), ("error", "right"), ("top reasons", "left"), ("s", "right")):
        t.add_column(col, justify=just)
    for name, _, argv in steps:
        m = read_manifest(argv[argv.index("--output") + 1])
        c = m.counts
        top = sorted(((n, k) for k, n in c["by_reason"].items() if not k.startswith("kept/")), reverse=True)[:3]
        t.add_row(
            name, f"{c['inputs']:,}", f"{c['outputs']:,}", f"{c['by_status']['rejected']:,}",
            f"{c['by_status']['duplicate']:,}", f"{c['by_status']['error']:,}",
            escape(", ".join(f"{k.split('/', 1)[1]} {n}" for n, k in top)), f"{seconds.get(name, 0):.1f}",
        )
    return t


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run(args)
