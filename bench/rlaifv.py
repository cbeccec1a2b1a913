"""RLAIF-V stage throughput against the stand-in (fixed latency L, at most C answers at once): responses/s of
``rlaifv generate`` and judgments/s of ``rlaifv feedback`` against the ideal C/L, calls per final pair, score
gaps and the length-bias statistic of the pairs.

    .venv/bin/python -m bench.rlaifv [--records 32 --n 4 --latency 0.05 --concurrency 16]

Images are distinct generated PNGs (identical requests would be shared, not sent). Wall times include
Beam start-up and writing, so the rates are lower bounds of the request phase.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n: int) -> list[bytes]:
    from PIL import Image

    rng = random.Random(0)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3)))
        im.putpixel((rng.randrange(64), rng.randrange(64)), (0, 0, 0))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=32)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--latency", type=float, default=0.05)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import helpers

    from pipelines import rlaifv as cli
    from rewriter.cache import ResponseCache
    from schemas.records import Pair

    os.environ.setdefault("MMCORPUS_PROGRESS", "0")
    tmp = tempfile.mkdtemp(prefix="bench-rlaifv-")
    pairs = [Pair(key=f"k{i:05d}", image=img, source=f"bench#{i}") for i, img in enumerate(_images(args.records))]
    inp = helpers.make_stage_dir(os.path.join(tmp, "in"), pairs, stage="dedup", num_shards=2)
    srv = subprocess.Popen([sys.executable, "-m", "rewriter.standin", "--rlaifv", "--latency", str(args.latency),
                            "--max-concurrency", str(args.concurrency)], cwd=REPO, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{int(srv.stdout.readline().split()[1])}/v1"
    common = ["--num-shards", "2", "--concurrency", str(args.concurrency)]
    try:
        t = time.perf_counter()
        cli.main(["generate", "--input", inp, "--output", f"{tmp}/gen", "--policy-endpoint", url, "--policy-model",
                  "p", "--n", str(args.n), "--cache-dir", f"{tmp}/c-gen", "--batch-size", "16", *common])
        t_gen = time.perf_counter() - t
        t = time.perf_counter()
        cli.main(["feedback", "--input", f"{tmp}/gen", "--output", f"{tmp}/fb", "--claims-endpoint", url,
                  "--claims-model", "c", "--labeler-endpoint", url, "--labeler-model", "l",
                  "--cache-dir", f"{tmp}/c-fb", "--batch-size", "16", *common])
        t_fb = time.perf_counter() - t
        cli.main(["pairs", "--input", f"{tmp}/fb", "--output", f"{tmp}/pairs", "--max-pairs-per-image", "2",
                  "--num-shards", "2"])
    finally:
        srv.stdin.close()
        srv.wait(10)
    gen_calls = len(ResponseCache(f"{tmp}/c-gen").keys())
    fb_cache = ResponseCache(f"{tmp}/c-fb")
    fb_entries = [fb_cache.get(k) for k in fb_cache.keys()]
    judgments = sum(e["text"].startswith('{"answer"') for e in fb_entries)
    with open(f"{tmp}/pairs/manifest.json") as f:
        m = json.load(f)
    n_pairs = m["extra"]["pair_stats"]["pairs"]
    ideal = args.concurrency / args.latency
    print(json.dumps({
        "records": args.records, "n": args.n, "L_s": args.latency, "C": args.concurrency, "ideal_rps": ideal,
        "generate_wall_s": round(t_gen, 2), "responses_per_s": round(gen_calls / t_gen, 1),
        "feedback_wall_s": round(t_fb, 2), "feedback_calls": len(fb_entries), "judgments": judgments,
        "judgments_per_s": round(judgments / t_fb, 1), "feedback_calls_per_s": round(len(fb_entries) / t_fb, 1),
        "pairs": n_pairs, "calls_per_pair": round((gen_calls + len(fb_entries)) / max(1, n_pairs), 2),
        "pair_stats": m["extra"]["pair_stats"], "load_avg_1m": round(os.getloadavg()[0], 1),
    }, indent=1))
    return 0


TITLE = "RLAIF-V stage throughput against the stand-in"


def section(quick: bool = False) -> str:
    """Markdown for BENCHMARKS.md (bench.run_all): the command and its output, verbatim, measured now."""
    import contextlib

    argv = ["--records", "8"] if quick else []
    buf = __import__("io").StringIO()
    with contextlib.redirect_stdout(buf):
        main(list(argv))
    cmd = " ".join(["python -m bench.rlaifv", *argv])
    return f"`{cmd}`\n\n```\n{buf.getvalue().rstrip()}\n```\n"


if __name__ == "__main__":
    raise SystemExit(main())
