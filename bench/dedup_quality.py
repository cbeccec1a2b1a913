"""Dedup quality before (``legacy-transitive``) and after (``strict``, the default) on the same data, in one run.

    .venv/bin/python -m bench.dedup_quality                      # before/after table (captions + photos)
    .venv/bin/python -m bench.dedup_quality --photo-copies 50    # a smaller photo set
    .venv/bin/python -m bench.dedup_quality --sweep              # also the shingling sweep (edges only)

Two data sets, each run through the whole ``Deduplicate`` transform (DirectRunner) once per mode:

* **captions** (the caption-only metadata pass): every caption of data/sample (cc3m tsv,
  img2dataset parquet TEXT, cc_images jsonl) plus, for a seeded sample of them, chains of realistic
  edits (trailing site names, numbering, case and punctuation, word swaps/replacements/insertions/
  drops, "Stock photo of" prefixes); each variant edits the previous one, so chains A~B~C where A
  and C differ more appear naturally. Ground truth: the exact Jaccard of the shingle sets, for
  every pair by brute force (a sparse product gives every pair's intersection).
* **photos**: ``bench.dedup_photos`` — the 18 bundled photos, each resized ``--photo-copies``
  times, each copy with its own real CC3M caption, captions bridging photos. Ground truth: the
  photo a copy was made from.

Metrics (issue 10):
* *recall* = share of the pairs that should be together that end in the same cluster (the same
  kept record): captions with exact J >= the configured ``near_caption_threshold`` (not t + 0.1);
  copies of the same photo (records removed as ``caption_overused`` are left out).
* *precision per member* = share of removed records (``duplicate`` rows with a kept record) that
  really are duplicates of the record kept in their place: exact J to it >= t (and, in the next
  column, >= t - 0.1, the grey zone); the same photo as the kept record.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import random
import sys
import tempfile
import time

import apache_beam as beam
import numpy as np
import scipy.sparse as sp

from bench.dedup_data import edit_caption, real_captions, vocabulary
from bench.dedup_photos import photo_pairs
from bench.dedup_photos import truth as truth_photo
from schemas import reasons
from transforms import minhash as mh
from transforms.dedup import LEGACY, STRICT, CandidateEdges, DedupConfig, Deduplicate, ExtractFeaturesFn
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
    must = [pq for pq, j in truth.items() if j >= t]
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
        "pairs_J_ge_t": len(must),
        "edges_found": len(edges),
        "recall_same_cluster": round(recall, 4),
        "recall_direct_edge": round(edge_recall, 4),
        "precision_edges_J_ge_t-0.1": round(precision, 4),
        "false_positive_edges": fp,
        "edits_caught": round(edits_caught, 4),
        "cross_family_edges": cross,
        "seconds_truth": round(t_truth, 1),
        "seconds_stage_edges": round(t_stage, 1),
    }


def run_dedup(pairs: list[Pair], cfg: DedupConfig, workdir: str) -> tuple[dict[str, dict], dict, float]:
    """Run ``Deduplicate`` on the DirectRunner; returns ({key: ledger fields}, report, seconds)."""
    out = os.path.join(workdir, "outcomes")
    rep_out = os.path.join(workdir, "report")
    t0 = time.perf_counter()
    with beam.Pipeline() as p:
        outcomes, report = p | beam.Create(pairs) | Deduplicate(cfg)
        _ = (
            outcomes
            | "Row" >> beam.Map(lambda o: json.dumps([o.key, o.status, o.reason, o.extra.get("kept_key")]))
            | "WriteOutcomes" >> beam.io.WriteToText(out)
        )
        _ = report | "ReportJson" >> beam.Map(json.dumps) | "WriteReport" >> beam.io.WriteToText(rep_out)
    seconds = time.perf_counter() - t0
    rows = {}
    for path in glob.glob(out + "*"):
        with open(path) as f:
            for line in f:
                key, status, reason, kept = json.loads(line)
                rows[key] = {"status": status, "reason": reason, "kept_key": kept}
    with open(glob.glob(rep_out + "*")[0]) as f:
        report = json.loads(f.read())
    return rows, report, seconds


def _label(rows: dict[str, dict], key: str) -> str:
    r = rows[key]
    return r["kept_key"] or key  # a kept singleton has no kept_key: its own cluster


def _summary(rows: dict[str, dict]) -> dict:
    kept = sum(1 for r in rows.values() if r["status"] == "kept")
    sizes: dict[str, int] = {}
    for k, r in rows.items():
        if r["reason"] != reasons.CAPTION_OVERUSED:
            sizes[_label(rows, k)] = sizes.get(_label(rows, k), 0) + 1
    return {"records": len(rows), "kept": kept, "largest_cluster": max(sizes.values(), default=0)}


def caption_quality(caps: list[str], cfg: DedupConfig, workdir: str, truth: dict) -> dict:
    """Recall at the threshold and precision per member on the caption-only pass."""
    keys = [f"{i:06d}" for i in range(len(caps))]
    rows, report, seconds = run_dedup([Pair(key=k, caption=c) for k, c in zip(keys, caps)], cfg, workdir)
    t = cfg.near_caption_threshold
    label = [_label(rows, k) for k in keys]
    must = [pq for pq, j in truth.items() if j >= t]
    recall = sum(1 for a, b in must if label[a] == label[b]) / max(1, len(must))
    sets = [set(mh.shingles(mh.normalize_caption(c), cfg.shingle, cfg.ngram)) for c in caps]

    def jac(a: int, b: int) -> float:
        u = len(sets[a] | sets[b])
        return len(sets[a] & sets[b]) / u if u else 1.0

    members = [(i, int(rows[k]["kept_key"])) for i, k in enumerate(keys) if rows[k]["status"] == "duplicate"]
    js = [jac(i, r) for i, r in members]
    return {
        **_summary(rows),
        "removed": len(members),
        "recall": round(recall, 4),
        "precision": round(sum(1 for j in js if j >= t) / max(1, len(js)), 4),
        "precision_grey": round(sum(1 for j in js if j >= t - 0.1) / max(1, len(js)), 4),
        "pairs_truth": len(must),
        "seconds": round(seconds, 1),
        "report": report,
        "_labels": label,  # kept key per caption, for comparing modes; not printed
    }


def photo_quality(pairs: list[Pair], cfg: DedupConfig, workdir: str) -> dict:
    """Recall over same-photo pairs and precision per member on the 18-photo set."""
    rows, report, seconds = run_dedup(pairs, cfg, workdir)
    photo = {p.key: truth_photo(p) for p in pairs}
    in_pass = [p.key for p in pairs if rows[p.key]["reason"] != reasons.CAPTION_OVERUSED]
    together: dict[tuple[str, int], int] = {}
    per_photo: dict[int, int] = {}
    for k in in_pass:
        together[(_label(rows, k), photo[k])] = together.get((_label(rows, k), photo[k]), 0) + 1
        per_photo[photo[k]] = per_photo.get(photo[k], 0) + 1
    pairs_same = sum(n * (n - 1) // 2 for n in per_photo.values())
    found = sum(n * (n - 1) // 2 for n in together.values())
    removed = [k for k in in_pass if rows[k]["status"] == "duplicate"]
    right = sum(1 for k in removed if photo[rows[k]["kept_key"]] == photo[k])
    kept_photos = {photo[k] for k in in_pass if rows[k]["status"] == "kept"}
    return {
        **_summary(rows),
        "removed": len(removed),
        "caption_overused": sum(1 for r in rows.values() if r["reason"] == reasons.CAPTION_OVERUSED),
        "photos_kept": len(kept_photos),
        "recall": round(found / max(1, pairs_same), 4),
        "precision": round(right / max(1, len(removed)), 4),
        "seconds": round(seconds, 1),
        "report": report,
    }


def table(results: list[dict]) -> str:
    head = ["data", "mode", "records", "kept", "removed", "largest cluster", "recall", "precision/member",
            "precision/member (t-0.1)", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["data"], r["mode"], r["records"], r["kept"], r["removed"], r["largest_cluster"], r["recall"],
                 r["precision"], r.get("precision_grey", "–"), r["seconds"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


TITLE = "Dedup quality before/after on real captions and photos"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo-copies", type=int, default=220, help="copies of each of the 18 photos (0: skip)")
    parser.add_argument("--no-captions", action="store_true", help="skip the caption set")
    parser.add_argument("--sweep", action="store_true", help="also the shingling sweep on candidate edges")
    parser.add_argument("--configs", default="word:1,word:2,word:3,char:3,char:4,char:5", help="sweep configs")
    parser.add_argument("--json", help="also write the results to this file")
    return parser


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def _split_pairs(legacy: list[str], strict: list[str], truth: dict, t: float) -> dict:
    """Pairs with exact J >= t that strict does not keep together, and how many legacy splits too."""
    split = [(a, b) for (a, b), j in truth.items() if j >= t and strict[a] != strict[b]]
    return {"split_strict": len(split), "split_in_legacy_too": sum(1 for a, b in split if legacy[a] != legacy[b])}


def measure(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(before/after rows, shingling sweep rows) for parsed ``args``."""
    base = DedupConfig()
    t = base.near_caption_threshold
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_captions:
            caps, family, depth = build_eval_set()
            truth = jaccard_pairs(caps, base.shingle, base.ngram, min_j=t)
            for mode in (LEGACY, STRICT):
                r = caption_quality(caps, dataclasses.replace(base, mode=mode), tempfile.mkdtemp(dir=tmp), truth)
                results.append({"data": f"captions (J >= {t})", "mode": mode, **r})
                print(json.dumps(_public(results[-1])), flush=True)
            results[-1]["split_pairs"] = _split_pairs(results[-2]["_labels"], results[-1]["_labels"], truth, t)
        if args.photo_copies:
            pairs = photo_pairs(copies=args.photo_copies)
            for mode in (LEGACY, STRICT):
                r = photo_quality(pairs, dataclasses.replace(base, mode=mode), tempfile.mkdtemp(dir=tmp))
                results.append({"data": f"18 photos x {args.photo_copies}", "mode": mode, **r})
                print(json.dumps(_public(results[-1])), flush=True)
        sweep = []
        if args.sweep:
            caps, family, depth = build_eval_set()
            for spec in args.configs.split(","):
                kind, n = spec.split(":")
                cfg = DedupConfig(shingle=kind, ngram=int(n), exact_image=False, near_image_max_hamming=None)
                sweep.append(evaluate(caps, family, depth, cfg, tempfile.mkdtemp(dir=tmp)))
                print(json.dumps(sweep[-1]), flush=True)
    return results, sweep


def sweep_table(sweep: list[dict]) -> str:
    """The shingling sweep, one row per shingling; the shipped default in bold."""
    default = DedupConfig()
    head = ["shingles", "pairs J >= t", "edges found", "recall (cluster)", "recall (direct edge)", "precision (edges J >= t-0.1)",
            "FP edges", "edits caught", "cross-family edges", "seconds (truth / edges)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sweep:
        name = r["shingle"].replace(":", " ") + "-grams"
        if r["shingle"] == f"{default.shingle}:{default.ngram}":
            name = f"**{name} (default)**"
        cells = [name, f"{r['pairs_J_ge_t']:,}", f"{r['edges_found']:,}", r["recall_same_cluster"], r["recall_direct_edge"],
                 r["precision_edges_J_ge_t-0.1"], f"{r['false_positive_edges']:,}", r["edits_caught"], f"{r['cross_family_edges']:,}",
                 f"{r['seconds_truth']} / {r['seconds_stage_edges']}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _notes(results: list[dict]) -> list[str]:
    """Sentences computed from the before/after rows (strict's rounds, caption cap, split pairs)."""
    out = []
    for r in results:
        if r["mode"] != STRICT:
            continue
        rr = r["report"].get("representative_rounds") or {}
        per_round = rr.get("members_per_round") or []
        text = (f"- {r['data']}, strict: members assigned per representative round "
                f"{' / '.join(f'{n:,}' for n in per_round)} (max {rr.get('max_split_rounds')}), "
                f"{rr.get('kept_unassigned_after_last_round', 0):,} kept after the last round")
        if r.get("caption_overused"):
            text += f"; {r['caption_overused']:,} records removed as `{reasons.CAPTION_OVERUSED}` (left out of recall)"
        if "split_pairs" in r:
            sp = r["split_pairs"]
            text += (f"; of the {r['pairs_truth']:,} caption pairs with J >= the threshold, {sp['split_strict']:,} do not share a "
                     f"kept record in strict, and {sp['split_in_legacy_too']:,} of those are apart in legacy too (never linked)")
        out.append(text + ".")
    return out


def section(quick: bool = False) -> str:
    """Markdown for BENCHMARKS.md: the before/after table and the shingling sweep (quick: 5 copies of each photo,
    no captions, no sweep)."""
    from bench.dedup_data import code_version

    argv = ["--photo-copies", "5", "--no-captions"] if quick else ["--sweep"]
    args = _parser().parse_args(argv)
    results, sweep = measure(args)
    base = DedupConfig()
    t = base.near_caption_threshold
    lines = ["`" + " ".join(["python -m bench.dedup_quality", *argv]) + f"` — code {code_version()}. Seconds are wall time on "
             "the shared machine (load average in the line above): not for comparison.", "",
             f"### Quality before (`{LEGACY}`) / after (`{STRICT}`, the default)", "",
             "One run, the same data, both modes through the whole `Deduplicate` transform (DirectRunner). Captions: the real "
             "sample captions plus realistic edit chains of a seeded sample of them; photos: `bench.dedup_photos`, the 18 bundled photos each resized "
             f"{args.photo_copies} times with its own real caption, captions bridging photos. Recall: pairs that belong together "
             f"(captions: exact Jaccard >= the configured {t}; photos: copies of one photo) that end with the same kept record. "
             f"Precision per member: removed records that really are duplicates of the record kept in their place (exact J >= {t}, "
             f"and >= {t - 0.1:.1f}; the same photo).", "", table(results), ""]
    lines += _notes(results)
    if sweep:
        caps, family, depth = build_eval_set()
        originals = sum(1 for d in depth if d == 0)
        chains = len({f for f, d in zip(family, depth) if d > 0})
        default_row = next((r for r in sweep if r["shingle"] == f"{base.shingle}:{base.ngram}"), None)
        good = [r["shingle"] for r in sweep if r["recall_same_cluster"] >= 0.95 and r["precision_edges_J_ge_t-0.1"] >= 0.95]
        bands, rows = sweep[0]["lsh_bands_rows"]
        lines += ["", f"### Shingling sweep — `python -m bench.dedup_quality --sweep` (candidate edges only)", "",
                  f"Eval set: the {originals:,} real captions of `data/sample` + {chains:,} edit chains of 1–3 realistic edits each "
                  f"(site-name suffix, number change, case/punctuation, word swap/replace/insert/drop, \"Stock photo of\" prefix), "
                  f"{len(caps) - originals:,} edited variants: {len(caps):,} captions. Ground truth: exact Jaccard of the shingle sets, brute force over all "
                  f"{len(caps) * (len(caps) - 1) // 2 / 1e6:,.0f}M pairs. Threshold {sweep[0]['threshold']}, {base.num_perm} perms, "
                  f"LSH {bands} bands × {rows} rows, candidates verified at estimated J >= {sweep[0]['verify_min_jaccard']}. "
                  "Recall = pairs with J >= t that end in one connected component of the found edges; precision = found edges "
                  "with exact J >= t - 0.1; edits caught = (original, edited variant) pairs in one component whatever their J; "
                  "cross-family edges = edges between different original captions.", "", sweep_table(sweep), "",
                  f"Shinglings with recall >= 0.95 and precision >= 0.95 in this run: {len(good)} of {len(sweep)} "
                  f"({', '.join(good) or 'none'})."]
        if default_row:
            lines.append(f"The default {base.shingle} {base.ngram}-grams catch {default_row['edits_caught']:.1%} of the edits at "
                         f"precision {default_row['precision_edges_J_ge_t-0.1']:.3f}, with {default_row['cross_family_edges']:,} "
                         "cross-family edges.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    results, sweep = measure(args)
    print()
    print("$ python -m bench.dedup_quality " + " ".join(argv))
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": argv, "before_after": [_public(r) for r in results], "sweep": sweep}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
