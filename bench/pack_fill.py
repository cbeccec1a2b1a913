"""Pack fill and speed, in one run: token fill and truncated tokens of (a) one sample per sequence,
(b) the MiniCPM-V paper's greedy packing with truncation, (c) our streaming best-fit packer, on the
real caption lengths of data/sample with real image sizes per stage profile, at seq-len 2048 and
4096; packer throughput; reader throughput against raw pyarrow / tarfile iteration of the same files.

    .venv/bin/python -m bench.pack_fill            # everything (about a minute on one core)
    .venv/bin/python -m bench.pack_fill --json     # machine-readable
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import pathlib
import shutil
import tarfile
import tempfile
import time

import pyarrow.parquet as pq

from schemas import packed as S
from transforms.packing import ALGO_GREEDY_TRUNCATE, Item, PackingConfig, fill_stats, pack_items
from transforms.tokens import DEFAULT_TOKENIZER, TextTokenizer, StageProfile, image_token_count, read_sample_captions

SAMPLE = pathlib.Path(__file__).resolve().parent.parent / "data" / "sample"
SEQ_LENS = (2048, 4096)


def real_captions() -> list[str]:
    """CC3M (8k), img2dataset's LAION-style sample (1k) and the 26 captions of the bundled photos."""
    caps = read_sample_captions(SAMPLE)
    caps += [t for t in pq.read_table(SAMPLE / "img2dataset_sample_1000.parquet", columns=["TEXT"]).column("TEXT").to_pylist() if t]
    return caps


def real_image_sizes() -> list[tuple[int, int]]:
    from PIL import Image

    files = sorted(glob.glob(str(SAMPLE / "cc_images" / "*.jpg")) + glob.glob(str(SAMPLE / "skimage_pairs" / "*.[pj][np]g")))
    sizes = []
    for f in files:
        with Image.open(f) as im:
            sizes.append(im.size)
    return sizes


# Document-like and high-resolution sizes (not in data/sample): a stress mix for stage 3's slicing.
STRESS_SIZES = [(1344, 1344), (1920, 1080), (1024, 768), (800, 1200), (640, 480), (448, 448), (2480, 3508), (300, 200)]


def items_for(caption_tokens: list[int], sizes: list[tuple[int, int]], stage: int, q: int = 96) -> list[Item]:
    """One Item per caption; its image is a size from ``sizes`` picked by a hash of the caption index."""
    if not sizes:  # caption-only data: text samples, no image
        return [Item(n + 1) for n in caption_tokens]
    prof = StageProfile.for_stage(stage, q)
    out = []
    for i, n in enumerate(caption_tokens):
        w, h = sizes[int(hashlib.sha1(str(i).encode()).hexdigest()[:8], 16) % len(sizes)]
        grid = prof.grid(*prof.stored_size(w, h))
        img = image_token_count(grid, q)
        out.append(Item(n + 1 + img, 1, 1 + (grid[0] * grid[1] if grid else 0), 1))  # + eos
    return out


def one_per_sequence(items: list[Item], seq_len: int) -> dict:
    tokens = sum(min(it.length, seq_len) for it in items)
    return {"packs": len(items), "fill": tokens / (len(items) * seq_len), "truncated": sum(max(0, it.length - seq_len) for it in items)}


def run_packer(items: list[Item], cfg: PackingConfig) -> tuple[dict, float]:
    t = time.perf_counter()
    packs = list(pack_items(items, cfg))
    dt = time.perf_counter() - t
    st = fill_stats(packs, items, cfg.seq_len)
    return {"packs": st.packs, "fill": st.fill, "truncated": st.truncated_tokens}, dt


def lower_bound_packs(lengths: list[int], seq_len: int) -> int:
    """No packing needs fewer packs than max(ceil(tokens / seq_len), max over k of ceil(n_k / k)),
    n_k = samples longer than seq_len / (k + 1) (at most k of them fit in one pack)."""
    bound = math.ceil(sum(lengths) / seq_len)
    ordered = sorted(lengths, reverse=True)
    for k in range(1, 64):
        n_k = sum(1 for x in ordered if x * (k + 1) > seq_len)
        bound = max(bound, math.ceil(n_k / k))
    return bound


def bench_fill(caption_tokens: list[int]) -> list[dict]:
    real, rows = real_image_sizes(), []
    cases = [(1, real, "real"), (2, real, "real"), (3, real, "real"), (3, STRESS_SIZES, "stress"), (1, [], "no image")]
    for stage, sizes, mix in cases:
        items = items_for(caption_tokens, sizes, stage)
        for seq_len in SEQ_LENS:
            fits = [it for it in items if it.length <= seq_len]
            row = {"stage": stage, "sizes": mix, "seq_len": seq_len, "samples": len(items), "too_long": len(items) - len(fits)}
            row["a_one_per_seq"] = one_per_sequence(items, seq_len)
            row["b_greedy_truncate"], _ = run_packer(items, PackingConfig(seq_len=seq_len, algorithm=ALGO_GREEDY_TRUNCATE))
            row["c_best_fit"], dt = run_packer(fits, PackingConfig(seq_len=seq_len))
            row["c_best_fit"]["samples_per_s"] = len(fits) / dt
            row["lower_bound_packs"] = lower_bound_packs([it.length for it in fits], seq_len)
            rows.append(row)
    return rows


def bench_packer_speed(caption_tokens: list[int], repeats: int = 3) -> dict:
    items = items_for(caption_tokens, real_image_sizes(), 3) * 4  # ~36k samples
    out = {"samples": len(items)}
    for name, cfg in (("best_fit", PackingConfig(seq_len=4096)), ("greedy_truncate", PackingConfig(seq_len=4096, algorithm=ALGO_GREEDY_TRUNCATE))):
        best = min(run_packer(items, cfg)[1] for _ in range(repeats))
        out[name] = len(items) / best
    out["best_fit_vs_greedy"] = out["best_fit"] / out["greedy_truncate"]
    return out


def build_shards(caption_ids: list[list[int]], workdir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Real pack shards (stage 1, seq 2048) of every caption with a real photo resized to 224 px,
    written by the pack stage's own renderer and shard writers."""
    from transforms.shards import PreparedSample, ShardConfig, render_pack, write_shards
    from transforms.tokens import prepare_image, sample_tokens

    tok = TextTokenizer()
    ids = tok.special_ids()
    prof = StageProfile.for_stage(1)
    photos = sorted(glob.glob(str(SAMPLE / "cc_images" / "*.jpg")))
    jpegs = [prepare_image(pathlib.Path(f).read_bytes(), prof) for f in photos]
    samples = []
    for i, cap in enumerate(caption_ids):
        jpeg, w, h = jpegs[i % len(jpegs)]
        st = sample_tokens(cap, True, None, prof.query_num, ids, tok.newline_ids)
        samples.append(PreparedSample(f"s{i:06d}", "", st.input_ids, st.labels, jpeg, w, h, None, st.image_length, st.slices))
    cfg = PackingConfig(seq_len=2048)
    packs = list(pack_items([s.item() for s in samples], cfg))
    out = {}
    for fmt in S.FORMATS:
        root = workdir / fmt
        rows = (render_pack(S.pack_id(0, n), 2048, [(samples[i], t) for i, t in p]) for n, p in enumerate(packs))
        infos = list(write_shards(rows, str(root), 0, ShardConfig(format=fmt, max_packs_per_shard=128)))
        index = {"pack_format": fmt, "seq_len": 2048, "tokens": ids, S.INDEX_SHARDS: [
            dict(path=i.path.split("/", 1)[1], packs=i.packs, row_groups=i.row_groups) for i in infos]}
        (root / S.PACK_DIR / S.INDEX_NAME).write_text(json.dumps(index))
        out[fmt] = root / S.PACK_DIR
    return out


def _raw_parquet(data_dir: pathlib.Path) -> tuple[int, int]:
    packs = tokens = 0
    for f in sorted(data_dir.glob("*.parquet")):
        pf = pq.ParquetFile(f)
        for rg in range(pf.num_row_groups):
            t = pf.read_row_group(rg)
            for name in S.PACK_ARRAY_FIELDS:
                t.column(name).combine_chunks().values.to_numpy()
            packs += t.num_rows
            tokens += sum(t.column(S.NUM_TOKENS).to_pylist())
    return packs, tokens


def _raw_tar(data_dir: pathlib.Path) -> tuple[int, int]:
    packs = nbytes = 0
    for f in sorted(data_dir.glob("*.tar")):
        with open(f, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
            for m in tar:
                nbytes += len(tar.extractfile(m).read())
                packs += m.name.endswith("." + S.WDS_EXT_META)
    return packs, nbytes


def bench_reader(caption_ids: list[list[int]], repeats: int = 3) -> dict:
    from mmcorpus_reader import PackDataset

    work = pathlib.Path(tempfile.mkdtemp(prefix="pack-bench-"))
    try:
        dirs = build_shards(caption_ids, work)
        out = {}
        for fmt, raw_fn in ((S.FORMAT_PARQUET, _raw_parquet), (S.FORMAT_WEBDATASET, _raw_tar)):
            d = dirs[fmt]

            def reader():
                n = t = 0
                for p in PackDataset(str(d), as_tensors=False):
                    n += 1
                    t += p["num_tokens"]
                return n, t

            def timed(fn):
                best, res = float("inf"), None
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    res = fn()
                    best = min(best, time.perf_counter() - t0)
                return best, res

            t_raw, _ = timed(lambda: raw_fn(d))
            t_rd, (packs, tokens) = timed(reader)
            mb = sum(f.stat().st_size for f in d.iterdir()) / 1e6
            out[fmt] = {
                "packs": packs, "tokens": tokens, "MB": round(mb, 1),
                "reader_packs_per_s": packs / t_rd, "reader_tokens_per_s": tokens / t_rd,
                "raw_packs_per_s": packs / t_raw, "reader_time_vs_raw": t_rd / t_raw,
            }
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_stage(copies: int = 20) -> dict:
    """The whole pack stage (DirectRunner, one process): the 26 bundled photos x ``copies`` under
    distinct keys, stage 3, seq 4096, Parquet. Image decode + resize + JPEG encode dominate."""
    from pipelines import pack

    sys_path = str(pathlib.Path(__file__).resolve().parent.parent / "tests")
    import sys

    if sys_path not in sys.path:
        sys.path.insert(0, sys_path)
    from pack.fixtures import make_input_dir, sample_pairs

    photos = [p for p in sample_pairs(captions_only=0) if p.image and p.key != "badimage0001"]
    pairs = [p.replace(key=f"{p.key}c{i:03d}") for i in range(copies) for p in photos]
    work = pathlib.Path(tempfile.mkdtemp(prefix="pack-stage-bench-"))
    try:
        src = make_input_dir(str(work / "in"), pairs)
        t = time.perf_counter()
        pack.main(["--input", src, "--output", str(work / "out"), "--stage", "3", "--seq-len", "4096"])
        dt = time.perf_counter() - t
        return {"samples": len(pairs), "seconds": dt, "samples_per_s": len(pairs) / dt}
    finally:
        shutil.rmtree(work, ignore_errors=True)


TITLE = "Pack fill and speed"


def tokenizer_identity(path: pathlib.Path = DEFAULT_TOKENIZER) -> str:
    """Which tokenizer the numbers are for: the bundled file's vocab size and sha256 prefix, read now."""
    from tokenizers import Tokenizer

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"bundled tokenizer `{path.relative_to(SAMPLE.parent.parent)}` (vocab {Tokenizer.from_file(str(path)).get_vocab_size():,}, sha256 {digest}…)"


def section(quick: bool = False) -> str:
    """Markdown for BENCHMARKS.md: fill per stage profile and seq-len, packer and reader speed, the stage."""
    repeats, copies = (1, 2) if quick else (3, 20)
    tok = TextTokenizer()
    caps = real_captions()
    caption_ids = tok.encode_batch(caps)
    lens = [len(c) for c in caption_ids]
    lines = [f"`python -m bench.pack_fill` ({len(caps):,} real captions of data/sample, {tokenizer_identity()}, mean "
             f"{sum(lens) / len(lens):.1f} tokens; image tokens per stage profile, q = 96; `stress` = document/high-res sizes; "
             "(c) = our best-fit packer, (b) = the paper's greedy packing with truncation)", "",
             "Fill = tokens / (packs × seq_len). Lower bound = max(⌈tokens / seq⌉, max over k of ⌈#samples longer than "
             "seq/(k+1) / k⌉): no packing without truncation can use fewer packs; \"best possible fill\" is the fill at it.", "",
             "| stage | image sizes | seq | (a) 1/seq fill | (b) greedy+trunc fill | (b) truncated tok | (c) best-fit fill | (c) truncated "
             "| (c) packs / lower bound | best possible fill | too long |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    fill = bench_fill(lens)
    for r in fill:
        a, b, c = r["a_one_per_seq"], r["b_greedy_truncate"], r["c_best_fit"]
        lines.append(f"| {r['stage']} | {r['sizes']} | {r['seq_len']} | {100 * a['fill']:.2f}% | {100 * b['fill']:.2f}% | {b['truncated']} "
                     f"| **{100 * c['fill']:.2f}%** | {c['truncated']} | {c['packs']} / {r['lower_bound_packs']} "
                     f"| {100 * c['fill'] * c['packs'] / r['lower_bound_packs']:.2f}% | {r['too_long']} |")
    at_bound = sum(r["c_best_fit"]["packs"] == r["lower_bound_packs"] for r in fill)
    lines += ["", f"In this run (c) truncated {sum(r['c_best_fit']['truncated'] for r in fill)} tokens in all, reached the lower bound "
              f"in {at_bound} of {len(fill)} cases and was at most {max(r['c_best_fit']['packs'] - r['lower_bound_packs'] for r in fill)} "
              f"packs above it; (b) cut {sum(r['b_greedy_truncate']['truncated'] for r in fill):,} tokens."]
    sp = bench_packer_speed(lens, repeats)
    lines += ["", f"Packer ({sp['samples']:,} stage-3 samples, seq 4096, one core, best of {repeats}): best-fit "
              f"{sp['best_fit']:,.0f} samples/s, greedy+truncation {sp['greedy_truncate']:,.0f} samples/s (ratio {sp['best_fit_vs_greedy']:.2f}).",
              "", "| reader | packs | MB | packs/s | M tokens/s | raw iteration packs/s | reader time / raw |", "|---|---|---|---|---|---|---|"]
    for fmt, r in bench_reader(caption_ids, repeats).items():
        lines.append(f"| {fmt} | {r['packs']} | {r['MB']} | {r['reader_packs_per_s']:,.0f} | {r['reader_tokens_per_s'] / 1e6:.2f} "
                     f"| {r['raw_packs_per_s']:,.0f} | {r['reader_time_vs_raw']:.2f} |")
    st = bench_stage(copies)
    lines += ["", f"Whole pack stage (DirectRunner, one process, {st['samples']} photos = the bundled photos × {copies} keys, stage 3, "
              f"seq 4096, Parquet): {st['seconds']:.1f} s including start-up = {st['samples_per_s']:.0f} samples/s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    tok = TextTokenizer()
    caps = real_captions()
    caption_ids = tok.encode_batch(caps)
    lens = [len(c) for c in caption_ids]
    result = {
        "captions": len(caps),
        "caption_tokens": {"mean": sum(lens) / len(lens), "max": max(lens)},
        "fill": bench_fill(lens),
        "packer_speed": bench_packer_speed(lens),
        "reader": bench_reader(caption_ids),
        "stage": bench_stage(),
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{len(caps)} real captions (data/sample), mean {result['caption_tokens']['mean']:.1f} tokens, max {max(lens)}")
    print("| stage | image sizes | seq | (a) 1/seq fill | (b) greedy+trunc fill | (b) truncated tok | (c) best-fit fill | (c) truncated | (c) packs / lower bound | best possible fill | too long |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["fill"]:
        a, b, c = r["a_one_per_seq"], r["b_greedy_truncate"], r["c_best_fit"]
        print(f"| {r['stage']} | {r['sizes']} | {r['seq_len']} | {100 * a['fill']:.2f}% | {100 * b['fill']:.2f}% | {b['truncated']} "
              f"| {100 * c['fill']:.2f}% | {c['truncated']} | {c['packs']} / {r['lower_bound_packs']} "
              f"| {100 * c['fill'] * c['packs'] / r['lower_bound_packs']:.2f}% | {r['too_long']} |")
    s = result["packer_speed"]
    print(f"packer ({s['samples']} stage-3 samples, seq 4096): best_fit {s['best_fit']:,.0f} samples/s, "
          f"greedy_truncate {s['greedy_truncate']:,.0f} samples/s (ratio {s['best_fit_vs_greedy']:.2f})")
    for fmt, r in result["reader"].items():
        print(f"reader {fmt}: {r['packs']} packs / {r['MB']} MB: {r['reader_packs_per_s']:,.0f} packs/s, "
              f"{r['reader_tokens_per_s'] / 1e6:.2f} M tokens/s on one core; raw iteration {r['raw_packs_per_s']:,.0f} packs/s; "
              f"reader time / raw = {r['reader_time_vs_raw']:.2f}")
    st = result["stage"]
    print(f"pack stage (DirectRunner, {st['samples']} photos, stage 3, seq 4096): {st['seconds']:.1f} s = "
          f"{st['samples_per_s']:.0f} samples/s end to end (decode + resize + JPEG + tokenize + pack + write)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
