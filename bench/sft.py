"""SFT data on the bundled instruction data: the part 1 / part 2 split (and how the measured rule agrees
with LLaVA-Bench's declared categories), pack fill at seq 2048 / 4096 per part, assistant-token share per
part, and samples/s of chat templating + packing.

    .venv/bin/python -m bench.sft            # markdown section (about half a minute)
    .venv/bin/python -m bench.sft --json
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import statistics
import tempfile
import time

from schemas import sft as S
from schemas.packed import IGNORE_INDEX
from transforms.packing import Item, PackingConfig, fill_stats, pack_items
from transforms.sft_ingest import SftIngestConfig, to_sample
from transforms.sft_split import SftSplitConfig
from transforms.tokens import StageProfile, TextTokenizer, read_sample_captions

REPO = pathlib.Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
TEMPLATE = REPO / "tests" / "fixtures" / "sft" / "chatml_generation.jinja"
SEQ_LENS = (2048, 4096)
COMMAND = ".venv/bin/python -m bench.sft"
CHAT_VOCAB = 2048  # the tiny chat tokenizer trained here; the split counts use the bundled one
QUERY_NUM = 64


def bundled_samples() -> list[S.SftSample]:
    """LLaVA-Bench qa90 (vqa, stand-in photos) + the 8 scikit-image captions (caption set)."""
    cfg = SftIngestConfig()
    out = []
    qa = SAMPLE / "llava_qa90"
    for i, line in enumerate((qa / "qa90_vqa.jsonl").read_text(encoding="utf-8").splitlines()):
        s = to_sample(json.loads(line), S.FORMAT_VQA, "llava_qa90", f"qa90_vqa.jsonl#{i}", cfg)
        s.image = (qa / "images" / s.image_ref).read_bytes()
        out.append(s)
    sk = SAMPLE / "skimage_pairs"
    for i, line in enumerate((sk / "captions.jsonl").read_text(encoding="utf-8").splitlines()):
        s = to_sample(json.loads(line), S.FORMAT_CAPTION, "skimage", f"captions.jsonl#{i}", cfg)
        s.image = (sk / s.image_ref).read_bytes()
        out.append(s)
    return out


def split(samples: list[S.SftSample], tok: TextTokenizer, cfg: SftSplitConfig) -> dict:
    agree = total = 0
    for s in samples:
        s.assistant_tokens = [len(x) for x in tok.encode_batch([a for _, a in s.turns])]
        s.part = cfg.part_of(s.assistant_tokens, s.category, s.image is not None)
        if s.category:
            total += 1
            agree += cfg.part_of(s.assistant_tokens, None, s.image is not None) == s.part
    per_cat: dict[str, list[int]] = {}
    for s in samples:
        per_cat.setdefault(s.category or f"({s.dataset})", []).append(sum(s.assistant_tokens) // len(s.turns))
    return {"measured_agrees_with_category": f"{agree}/{total}",
            "tokens_per_turn": {k: {"min": min(v), "median": statistics.median(v), "max": max(v)} for k, v in sorted(per_cat.items())}}


def image_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size


def templated(samples: list[S.SftSample], tok_dir: str, profile: StageProfile):
    from transforms.sft_template import ChatTemplater, load_chat_tokenizer

    t = ChatTemplater(load_chat_tokenizer(tok_dir), profile.query_num)
    sizes = {id(s): profile.stored_size(*image_size(s.image)) for s in samples if s.image}
    t0 = time.perf_counter()
    out = []
    for s in samples:
        grid = profile.grid(*sizes[id(s)]) if s.image else None
        out.append((s, t.tokens(s.messages(), grid=grid, has_image=s.image is not None)))
    return out, time.perf_counter() - t0


def run(repeats: int = 20) -> dict:
    samples = bundled_samples()
    tok = TextTokenizer()
    cfg = SftSplitConfig()
    res: dict = {"samples": len(samples), "split_rule": split(samples, tok, cfg)}
    res["split"] = {}
    for s in samples:
        d = res["split"].setdefault(s.dataset, {"part1": 0, "part2": 0})
        d[f"part{s.part}"] += 1
    profile = StageProfile.for_stage(3, query_num=QUERY_NUM)
    with tempfile.TemporaryDirectory() as tmp:
        from transforms.sft_template import build_chat_tokenizer

        texts = read_sample_captions(SAMPLE)[:3000] + [a for s in samples for q, a in s.turns]
        tok_dir = build_chat_tokenizer(tmp, TEMPLATE, texts, vocab_size=CHAT_VOCAB)
        toks, _ = templated(samples, tok_dir, profile)
        # throughput on repeats of the set: templating + packing (images are not decoded here)
        many = samples * repeats
        t0 = time.perf_counter()
        many_toks, t_tpl = templated(many, tok_dir, profile)
        items = [Item(len(x), 1 if s.image else 0, 0) for s, x in many_toks]
        for _ in pack_items(items, PackingConfig(seq_len=4096)):
            pass
        res["throughput"] = {"samples": len(many), "samples_per_s": round(len(many) / (time.perf_counter() - t0), 1),
                             "templating_share": round(t_tpl / (time.perf_counter() - t0), 3)}
    res["parts"] = {}
    for part in (1, 2):
        sel = [(s, x) for s, x in toks if s.part == part]
        n_tok = sum(len(x) for _, x in sel)
        n_asst = sum(sum(1 for lab in x.labels if lab != IGNORE_INDEX) for _, x in sel)
        n_img = sum(x.image_length for _, x in sel)
        row = {"samples": len(sel), "tokens": n_tok, "mean_len": round(n_tok / len(sel), 1),
               "assistant_share": round(n_asst / n_tok, 4), "image_share": round(n_img / n_tok, 4), "fill": {}}
        items = [Item(len(x), 1 if x.image_length else 0, 0) for _, x in sel]
        for seq in SEQ_LENS:
            packs = list(pack_items([it for it in items if it.length <= seq], PackingConfig(seq_len=seq)))
            st = fill_stats(packs, items, seq)
            row["fill"][seq] = {"packs": st.packs, "fill": round(st.fill, 4), "too_long": sum(it.length > seq for it in items)}
        res["parts"][part] = row
    return res


TITLE = "SFT"


def section(quick: bool = False) -> str:
    """Markdown for BENCHMARKS.md (bench.run_all): the command and the tables, measured now (no quick mode)."""
    md, cmd = markdown_section()
    return f"`{cmd}`\n\n{md}\n"


def markdown_section(res: dict | None = None) -> tuple[str, str]:
    """The BENCHMARKS.md section (markdown) and the command that produced it."""
    res = res or run()
    lines = [
        f"Inputs: LLaVA-Bench qa90 ({sum(res['split']['llava_qa90'].values())} conversations, stand-in photos) + "
        f"{sum(res['split']['skimage'].values())} scikit-image captions; stage-3 profile "
        f"(adaptive slicing, q = {QUERY_NUM}); tiny BPE chat tokenizer (vocab {CHAT_VOCAB}) trained here, with the ChatML template of "
        f"tests/fixtures/sft; split tokens counted with the bundled tokenizer.",
        "",
        "| source | part 1 | part 2 |", "|---|---|---|",
    ]
    for ds, c in sorted(res["split"].items()):
        lines.append(f"| {ds} | {c['part1']} | {c['part2']} |")
    r = res["split_rule"]
    lines += ["", f"Measured rule alone (categories ignored) agrees with the declared category on {r['measured_agrees_with_category']} "
              "LLaVA-Bench samples. Assistant tokens per turn (min / median / max): "
              + "; ".join(f"{k} {v['min']}/{v['median']}/{v['max']}" for k, v in r["tokens_per_turn"].items()) + ".", "",
              "| part | samples | mean tokens | assistant share | image share | fill @2048 (packs) | fill @4096 (packs) |",
              "|---|---|---|---|---|---|---|"]
    for part, row in sorted(res["parts"].items()):
        f = row["fill"]
        lines.append(
            f"| {part} | {row['samples']} | {row['mean_len']} | {100 * row['assistant_share']:.1f}% | {100 * row['image_share']:.1f}% | "
            + " | ".join(f"{100 * f[s]['fill']:.2f}% ({f[s]['packs']})" + (f", {f[s]['too_long']} too long" if f[s]["too_long"] else "") for s in SEQ_LENS)
            + " |"
        )
    t = res["throughput"]
    lines += ["", f"Templating + packing: {t['samples_per_s']} samples/s on {t['samples']} samples (templating "
              f"{100 * t['templating_share']:.0f}% of the time; images not decoded)."]
    return "\n".join(lines), COMMAND


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = run()
    if args.json:
        print(json.dumps(res, indent=1, default=str))
    else:
        md, cmd = markdown_section(res)
        print(f"`{cmd}`\n\n{md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
