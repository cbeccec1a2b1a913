"""Dedup quality on real captions: precision/recall of near-caption duplicates against brute-force
exact Jaccard, plus how many realistic edits are caught and how many unrelated captions are merged,
for several shingling choices.

    .venv/bin/python -m bench.dedup_quality                      # default config + shingling sweep
    .venv/bin/python -m bench.dedup_quality --configs word:2     # one shingling only

Eval set: every caption of data/sample (cc3m tsv, img2dataset parquet TEXT, cc_images jsonl) plus,
for a seeded sample of them, chains of realistic edits (trailing site names, numbering, case and
punctuation, word swaps/replacements/insertions/drops, "Stock photo of" prefixes); each variant is
an edit of the previous one, so chains A~B~C where A and C differ more appear naturally.

Definitions (issue 3): ground truth is the exact Jaccard of the shingle sets, computed for every
pair by brute force (a sparse product gives every pair's intersection; pairs absent from it share
no shingle, J = 0). *Recall* = share of pairs with J >= threshold + 0.1 that the stage puts in the
same cluster. *Precision* = share of the candidate edges the stage found (after verification)
whose J >= threshold - 0.1 (an edge with J < threshold - 0.1 is a false positive; edges in the
grey zone between count as correct). Edit catch rate and unrelated merges are reported besides.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import random
import sys
import tempfile
import time

import apache_beam as beam
import numpy as np
import scipy.sparse as sp

from bench.dedup_data import edit_caption, real_captions, vocabulary, write_caption_stage
from schemas import reasons
from transforms import minhash as mh
from transforms.dedup import CandidateEdges, DedupConfig, ExtractFeaturesFn
from schemas.records import Pair


def build_eval_set(seed: int = 0, n_edited: int = 2000) -> tuple[list[str], list[int], list[int]]:
    """(captions, family id, edit depth). Originals have depth 0; family = index of the original."""
    rng = random.Random(seed)
    originals = real_captions()
    vocab = vocabulary(originals)
    caps = list(originals)
    family = list(range(len(originals)))
    depth = [0] * len(originals)
    for i in rng.sample(range(len(originals)), n_edited):
        text = originals[i]
        for d in range(1, rng.randint(1, 3) + 1):
            text, _ = edit_caption(text, rng, vocab)
            caps.append(text)
            family.append(i)
            depth.append(d)
    return caps, family, depth


def jaccard_pairs(caps: list[str], kind: str, n: int, min_j: float, block: int = 512) -> dict[tuple[int, int], float]:
    """Exact Jaccard of every pair with J >= min_j, by brute force over all pairs: a sparse
    product of a block of rows against all rows gives every pair's intersection size (pairs absent
    from it share no shingle, J = 0); blocks keep the memory bounded for char n-grams."""
    vocab: dict[str, int] = {}
    rows, cols = [], []
    for i, c in enumerate(caps):
        for s in mh.shingles(mh.normalize_caption(c), kind, n):
            rows.append(i)
            cols.append(vocab.setdefault(s, len(vocab)))
    x = sp.csr_matrix((np.ones(len(rows), dtype=np.int32), (rows, cols)), shape=(len(caps), len(vocab)))
    sizes = np.asarray(x.sum(axis=1)).ravel()
    xt = x.T.tocsc()
    out: dict[tuple[int, int], float] = {}
    for lo in range(0, len(caps), block):
        inter = (x[lo : lo + block] @ xt).tocoo()
        r = inter.row + lo
        upper = inter.col > r
        r, c, d = r[upper], inter.col[upper], inter.data[upper]
        j = d / (sizes[r] + sizes[c] - d)
        keep = j >= min_j
        out.update({(int(a), int(b)): float(v) for a, b, v in zip(r[keep], c[keep], j[keep])})
    return out


def found_edges(caps: list[str], cfg: DedupConfig, workdir: str) -> set[tuple[int, int]]:
    """Run the stage's own feature + candidate-edge transforms (DirectRunner) on the captions."""
    out = os.path.join(workdir, "edges")
    pairs = [Pair(key=f"{i:06d}", caption=c) for i, c in enumerate(caps)]
    with beam.Pipeline() as p:
        _ = (
            p
            | beam.Create(pairs)
            | beam.BatchElements(min_batch_size=64, max_batch_size=4096)
            | beam.ParDo(ExtractFeaturesFn(cfg))
            | CandidateEdges(cfg)
            | beam.Filter(lambda e: e[2] == reasons.NEAR_CAPTION)
            | beam.Map(lambda e: f"{e[0]} {e[1]}")
            | beam.io.WriteToText(out)
        )
    edges = set()
    for path in glob.glob(out + "*"):
        with open(path) as f:
            for line in f:
                a, b = (int(x) for x in line.split())
                edges.add((min(a, b), max(a, b)))
    return edges


def components(n: int, edges: set[tuple[int, int]]) -> list[int]:
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [find(i) for i in range(n)]


def evaluate(caps, family, depth, cfg: DedupConfig, workdir: str) -> dict:
    t = cfg.near_caption_threshold
    t0 = time.perf_counter()
    truth = jaccard_pairs(caps, cfg.shingle, cfg.ngram, min_j=t - 0.1)
    t_truth = time.perf_counter() - t0
    t0 = time.perf_counter()
    edges = found_edges(caps, cfg, workdir)
    t_stage = time.perf_counter() - t0
    comp = components(len(caps), edges)
    must = [pq for pq, j in truth.items() if j >= t + 0.1]
    recall = sum(1 for a, b in must if comp[a] == comp[b]) / max(1, len(must))
    edge_recall = sum(1 for pq in must if pq in edges) / max(1, len(must))
    fp = sum(1 for pq in edges if pq not in truth)  # truth holds exactly the pairs with J >= t - 0.1
    precision = 1.0 - fp / max(1, len(edges))
    # Realistic edits: (original, variant) of one family; unrelated: edges across families.
    edit_pairs = [(family[i], i) for i in range(len(caps)) if depth[i] > 0]
    edits_caught = sum(1 for a, b in edit_pairs if comp[a] == comp[b]) / max(1, len(edit_pairs))
    cross = sum(1 for a, b in edges if family[a] != family[b])
    return {
        "shingle": f"{cfg.shingle}:{cfg.ngram}",
        "threshold": t,
        "lsh_bands_rows": list(cfg.lsh_params()),
        "verify_min_jaccard": cfg.verify_min_jaccard,
        "captions": len(caps),
        "pairs_J_ge_t+0.1": len(must),
        "edges_found": len(edges),
        "recall_same_cluster": round(recall, 4),
        "recall_direct_edge": round(edge_recall, 4),
        "precision_edges": round(precision, 4),
        "false_positive_edges": fp,
        "edits_caught": round(edits_caught, 4),
        "cross_family_edges": cross,
        "seconds_truth": round(t_truth, 1),
        "seconds_stage_edges": round(t_stage, 1),
    }


def stage_check(caps, family, cfg: DedupConfig, workdir: str) -> dict:
    """Run the whole `mmcorpus dedup` stage on the eval set; recall from the clusters in its ledger."""
    from pipelines import dedup
    from transforms.stage_io import read_manifest, read_table

    inp = write_caption_stage(os.path.join(workdir, "in"), caps, num_shards=4)
    cfg_path = os.path.join(workdir, "cfg.toml")
    with open(cfg_path, "w") as f:
        f.write("[dedup]\n")
        for k, v in dataclasses.asdict(cfg).items():
            if v is None:
                continue
            f.write(f"{k} = {json.dumps(v)}\n")
    out = os.path.join(workdir, "stage")
    dedup.main(["--input", inp, "--output", out, "--config", cfg_path, "--force"])
    m = read_manifest(out)
    key_index = {hashlib.sha1(f"synthetic-{i}".encode()).hexdigest()[:16]: i for i in range(len(caps))}
    cluster = list(range(len(caps)))
    for row in read_table(out, "ledger").to_pylist():
        if row["cluster_id"] is not None:
            cluster[key_index[row["key"]]] = row["cluster_id"]
    t = cfg.near_caption_threshold
    truth = jaccard_pairs(caps, cfg.shingle, cfg.ngram, min_j=t + 0.1)
    recall = sum(1 for a, b in truth if cluster[a] == cluster[b]) / max(1, len(truth))
    return {
        "stage_recall_same_cluster": round(recall, 4),
        "stage_counts": m.counts["by_reason"],
        "components": m.extra["dedup"]["components"],
    }


TITLE = "Dedup quality on real captions"


def section(quick: bool = False) -> str:
    """Markdown for BENCHMARKS.md: the shingling sweep (quick: char 5-grams only) and the whole stage's recall."""
    configs = "char:5" if quick else "word:1,word:2,word:3,char:3,char:4,char:5"
    base = DedupConfig()
    caps, family, depth = build_eval_set()
    lines = [f"`python -m bench.dedup_quality --configs {configs}" + ("`" if quick else " --stage`")
             + f" ({len(caps):,} captions: the real captions of data/sample + realistic edit chains; ground truth by brute-force "
             f"exact Jaccard; threshold {base.near_caption_threshold})", "",
             "| shingles | LSH bands × rows | pairs J ≥ t+0.1 | recall (cluster) | recall (direct edge) | precision | FP edges | edits caught | cross-family edges |",
             "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for spec in configs.split(","):
            kind, n = spec.split(":")
            cfg = DedupConfig(shingle=kind, ngram=int(n), exact_image=False, near_image_max_hamming=None)
            r = evaluate(caps, family, depth, cfg, tempfile.mkdtemp(dir=tmp))
            bands, rows = r["lsh_bands_rows"]
            default = " (default)" if (kind, int(n)) == (base.shingle, base.ngram) else ""
            lines.append(f"| {kind} {n}{default} | {bands} × {rows} | {r['pairs_J_ge_t+0.1']:,} | {r['recall_same_cluster']} | "
                         f"{r['recall_direct_edge']} | {r['precision_edges']} | {r['false_positive_edges']:,} | {r['edits_caught']} | "
                         f"{r['cross_family_edges']:,} |")
        if not quick:
            st = stage_check(caps, family, DedupConfig(near_image_max_hamming=None), tempfile.mkdtemp(dir=tmp))
            comp = st["components"]
            lines += ["", f"Whole `mmcorpus dedup` stage on the same set (default config): recall from the ledger's clusters "
                      f"**{st['stage_recall_same_cluster']}**; counts {st['stage_counts']}; {comp.get('rounds')} clustering rounds."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="word:1,word:2,word:3,char:3,char:4,char:5")
    parser.add_argument("--threshold", type=float, default=DedupConfig().near_caption_threshold)
    parser.add_argument("--verify", type=float, default=DedupConfig().verify_min_jaccard,
                        help="verify_min_jaccard (negative: off)")
    parser.add_argument("--stage", action="store_true", help="also run the whole stage with the default config")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    caps, family, depth = build_eval_set()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.configs.split(","):
            kind, n = spec.split(":")
            cfg = DedupConfig(
                shingle=kind, ngram=int(n), near_caption_threshold=args.threshold,
                verify_min_jaccard=None if args.verify < 0 else args.verify,
                exact_image=False, near_image_max_hamming=None,
            )
            r = evaluate(caps, family, depth, cfg, tempfile.mkdtemp(dir=tmp))
            results.append(r)
            print(json.dumps(r), flush=True)
        if args.stage:
            s = stage_check(caps, family, DedupConfig(near_image_max_hamming=None), tempfile.mkdtemp(dir=tmp))
            print(json.dumps(s), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
