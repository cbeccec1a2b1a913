"""Selection bench: N synthetic caption records from 3 sources → filter → select stage 1 and a disjoint
stage 2 → shares vs targets (percentage points), overlap, byte-identical rerun, and select vs filter
throughput on the same records in the same run.

    python -m bench.select_mix --records 30000 --workdir /tmp/selbench
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import random
import shutil
import time

from pipelines import cli
from transforms.stage_io import read_table

WEIGHTS = {"cc": 0.5, "coyo": 0.3, "laion": 0.2}
POOL_SHARE = {"cc": 0.2, "coyo": 0.5, "laion": 0.3}  # sources arrive in other proportions than the mix


def _vocab(rng: random.Random, n: int = 800) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def make_inputs(root: pathlib.Path, records: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    vocab = _vocab(rng)
    for name, share in POOL_SHARE.items():
        d = root / "in" / name
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "part.tsv", "w", encoding="utf-8") as f:
            for i in range(int(records * share)):
                words = " ".join(rng.choice(vocab) for _ in range(rng.randint(8, 14)))
                f.write(f"{words}\thttp://{name}.example/{i}.jpg\n")


def _sha_dir(d: pathlib.Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            h.update(str(p.relative_to(d)).encode() + p.read_bytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=30000)
    ap.add_argument("--workdir", default="/tmp/select_bench")
    args = ap.parse_args(argv)
    root = pathlib.Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    make_inputs(root, args.records)
    (root / "sources.toml").write_text("".join(
        f'[sources.{n}]\ncaption_col = "0"\nurl_col = "1"\nlicense = "synthetic"\n' for n in POOL_SHARE))
    target1, target2 = args.records // 4, args.records // 5
    (root / "mix.toml").write_text(
        f"[select]\ntarget_pairs = {target1}\n[select.weights]\n"
        + "".join(f"{n} = {w}\n" for n, w in WEIGHTS.items())
        + f'[select.stage2]\ntarget_pairs = {target2}\nallow_upscale = true\nearlier = "{root / "s1"}"\n'
    )
    inputs = [a for n in POOL_SHARE for a in ("--input", f"{n}={root / 'in' / n}")]
    t = time.monotonic()
    assert cli.main(["filter", *inputs, "--config", str(root / "sources.toml"), "--output", str(root / "filter")]) == 0
    t_filter = time.monotonic() - t
    times = {}
    for name, stage in (("s1", 1), ("s2", 2), ("s1b", 1)):
        t = time.monotonic()
        assert cli.main(["select", "--input", str(root / "filter"), "--stage", str(stage), "--config",
                         str(root / "mix.toml"), "--output", str(root / name)]) == 0
        times[name] = time.monotonic() - t
    n_filter = len(read_table(str(root / "filter"), columns=["key"]))
    report = {"records": args.records, "filter_kept": n_filter, "filter_s": round(t_filter, 1),
              "select_s": {k: round(v, 1) for k, v in times.items()},
              "throughput_ratio_select1_over_filter": round(t_filter / times["s1"], 2),
              "rerun_identical": _sha_dir(root / "s1") == _sha_dir(root / "s1b")}
    keys = {}
    for name in ("s1", "s2"):
        rows = read_table(str(root / name), columns=["key", "dataset"]).to_pylist()
        keys[name] = {r["key"] for r in rows}
        n = len(rows)
        got = {d: sum(1 for r in rows if r["dataset"] == d) for d in WEIGHTS}
        report[name] = {"selected": n, "pp_off_target": {d: round(100 * (got[d] / n - WEIGHTS[d]), 4) for d in WEIGHTS}}
    report["overlap_s1_s2"] = len(keys["s1"] & keys["s2"])
    print(json.dumps(report, indent=2))
    return 0


TITLE = "Selection mix"


def section(quick: bool = False) -> str:
    """Markdown for BENCHMARKS.md (bench.run_all): the command and its output, verbatim, measured now."""
    import contextlib

    argv = ["--records", "3000"] if quick else []
    buf = __import__("io").StringIO()
    with contextlib.redirect_stdout(buf):
        main(list(argv))
    cmd = " ".join(["python -m bench.select_mix", *argv])
    return f"`{cmd}`\n\n```\n{buf.getvalue().rstrip()}\n```\n"


if __name__ == "__main__":
    raise SystemExit(main())
