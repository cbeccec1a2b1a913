"""RLAIF-V stage throughput against the stand-in (fixed latency L, at most C answers at once): responses/s of
``rlaifv generate`` and judgments/s of ``rlaifv feedback`` against the ideal C/L, calls per final pair, score
gaps and the length-bias statistic of the pairs; then projected GPU-hours for 3K images x 8 responses with
7-8B models from published vLLM throughput (sources and arithmetic printed).

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


# --- projection: GPU-hours for the paper's scale on 7-8B models ---------------------------------------

# Published vLLM throughput (Llama-3.1-8B-Instruct, one GPU each), quoted from the sources:
#   A100: "On a single NVIDIA A100 40GB, decode at one request per time runs at about 75 tokens/sec ...
#         Batching buys throughput almost for free up to a concurrency of 8, a 6.6x gain" with "a fixed
#         1024-token input and a fixed 128-token output" (BF16, vLLM 0.23.0, `vllm bench serve`).
#   H100: concurrency sweep "on a single H100-80GB-HBM3 via vLLM 0.21.0, fp16": 1,384.2 tok/s at
#         concurrency 16 (the peak of its sweep).
A100_SOURCE = ("J. Musgrave, 'vLLM throughput-latency sweep on NVIDIA A100', "
               "https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on")
A100_TOK_S_C1, A100_GAIN_C8, A100_IN, A100_OUT = 75.0, 6.6, 1024, 128
H100_SOURCE = ("InferenceBench, 'Recipe: concurrency sweep' (Llama-3.1-8B-Instruct, vLLM 0.21.0, H100-80GB), "
               "https://yobitelcomm.github.io/bench/recipes/concurrency-sweep/")
H100_TOK_S = 1384.2
# Tokens per call, as `mmcorpus rlaifv generate|feedback` estimate them (pipelines/rlaifv.py estimate()):
IMAGE_TOKENS, POLICY_OUT, CLAIM_TOKENS, LABELER_OUT = 768, 150, 12, 6


def projection(images: int = 3000, n: int = 8, per_response: dict | None = None,
               pairs_per_image: int = 2, label: str = "") -> dict:
    """GPU-hours of generate + feedback for ``images`` x ``n`` responses with a 7-8B policy, claims model
    and labeler. ``per_response``: calls per policy response of claims, questions and labeler (default:
    the CLI estimate's 1, 1 and 6 claims); tokens per call are the CLI estimate's. Two figures from the
    published numbers above:

    - A100 upper bound by request: a request of ours is at most as heavy as the benchmark's
      (1024 in / 128 out) when its prompt is <= 1024 tokens, so it costs <= 1/rate seconds, rate =
      75 x 6.6 / 128 requests/s; a longer output counts out/128 requests.
    - H100 decode only: output tokens / 1,384.2 tok/s (image prefill not counted).
    """
    per = {"claims": 1.0, "questions": 1.0, "labeler": 6.0, **(per_response or {})}
    responses = images * n
    claim_out = CLAIM_TOKENS * 6
    calls = {  # (requests, prompt tokens, output tokens) per call type
        "policy": (responses, IMAGE_TOKENS + 16, POLICY_OUT),
        "claims": (round(responses * per["claims"]), 60 + 600 // 4, claim_out),
        "questions": (round(responses * per["questions"]), 60 + claim_out, claim_out),
        "labeler": (round(responses * per["labeler"]), IMAGE_TOKENS + 40, LABELER_OUT),
    }
    a100_rate = A100_TOK_S_C1 * A100_GAIN_C8 / A100_OUT  # requests/s of the benchmark's shape
    rows, a100_s, out_tokens, requests = {}, 0.0, 0, 0
    for name, (req, tin, tout) in calls.items():
        assert tin <= A100_IN  # else the bound does not hold
        sec = req * max(1.0, tout / A100_OUT) / a100_rate
        rows[name] = {"requests": req, "prompt_tokens_per_call": tin, "output_tokens_per_call": tout,
                      "a100_gpu_h_upper": round(sec / 3600, 2)}
        a100_s += sec
        out_tokens += req * tout
        requests += req
    pairs = images * pairs_per_image
    return {
        "label": label, "images": images, "responses_per_image": n, "calls_per_response": per, "pairs": pairs,
        "requests": requests, "calls_per_final_pair": round(requests / pairs, 1), "by_call": rows,
        "a100_requests_per_s": round(a100_rate, 2), "a100_gpu_h_upper": round(a100_s / 3600, 1),
        "output_tokens": out_tokens, "h100_gpu_h_decode": round(out_tokens / H100_TOK_S / 3600, 1),
    }


def projection_text(p: dict) -> str:
    r, per = p["by_call"], p["calls_per_response"]
    lines = [
        f"Projected GPU-hours, {p['images']:,} images x {p['responses_per_image']} responses -> {p['pairs']:,} "
        f"pairs, 7-8B policy, claims model and labeler; calls per response {p['label']}: claims {per['claims']:g}, "
        f"questions {per['questions']:g}, labeler {per['labeler']:g}; tokens per call as the CLI estimate "
        f"(prompt/output: policy {r['policy']['prompt_tokens_per_call']}/{r['policy']['output_tokens_per_call']}, "
        f"claims {r['claims']['prompt_tokens_per_call']}/{r['claims']['output_tokens_per_call']}, questions "
        f"{r['questions']['prompt_tokens_per_call']}/{r['questions']['output_tokens_per_call']}, labeler "
        f"{r['labeler']['prompt_tokens_per_call']}/{r['labeler']['output_tokens_per_call']})",
        f"  requests: policy {r['policy']['requests']:,} + claims {r['claims']['requests']:,} + questions "
        f"{r['questions']['requests']:,} + labeler {r['labeler']['requests']:,} = {p['requests']:,} "
        f"= {p['calls_per_final_pair']} calls per final pair",
        f"  A100 upper bound: {A100_TOK_S_C1:g} tok/s x {A100_GAIN_C8:g} (C=8) / {A100_OUT} = "
        f"{p['a100_requests_per_s']} requests/s of {A100_IN} in / {A100_OUT} out; each call <= one such request "
        f"(a policy call {POLICY_OUT}/{A100_OUT} of one) -> {p['a100_gpu_h_upper']} GPU-h "
        f"(policy {r['policy']['a100_gpu_h_upper']}, claims {r['claims']['a100_gpu_h_upper']}, questions "
        f"{r['questions']['a100_gpu_h_upper']}, labeler {r['labeler']['a100_gpu_h_upper']})",
        f"    source: {A100_SOURCE}",
        f"  H100 decode only: {p['output_tokens']:,} output tokens / {H100_TOK_S:,} tok/s = "
        f"{p['h100_gpu_h_decode']} GPU-h (prefill not counted; the cited rate is the sweep's peak at C=16)",
        f"    source: {H100_SOURCE}",
    ]
    return "\n".join(lines)


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
    claims_calls = sum(e["text"].startswith('{"claims"') for e in fb_entries)
    by_call = {"policy": gen_calls, "claims": claims_calls, "questions": len(fb_entries) - judgments - claims_calls,
               "labeler": judgments}
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
        "measured_by_call": by_call,
    }, indent=1))
    # Calls per response as measured here (the stand-in's answers: few claims, identical responses shared),
    # then the CLI estimate's 6 claims per response; the labeler calls dominate the upper bound, and they
    # share the image prefix (vLLM's prefix caching), so the real cost lies between the two figures.
    measured = {k: round(v / max(1, gen_calls), 3) for k, v in by_call.items() if k != "policy"}
    print(projection_text(projection(per_response=measured, label="(measured on the stand-in)")))
    print(projection_text(projection(label="(CLI estimate, 6 claims)")))
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
