"""`mmcorpus rlaifv generate|feedback|pairs|export`: RLAIF-V preference data (responses → claims → feedback → DPO).

Examples:
    mmcorpus rlaifv generate --input out/dedup --output out/rlaifv-gen \
        --policy-endpoint http://127.0.0.1:8001/v1 --policy-model policy --n 8 --temperature 0.7 --top-p 0.9
    mmcorpus rlaifv feedback --input out/rlaifv-gen --output out/rlaifv-fb \
        --claims-endpoint http://127.0.0.1:8002/v1 --claims-model llm \
        --labeler-endpoint http://127.0.0.1:8003/v1 --labeler-model mllm
    mmcorpus rlaifv pairs --input out/rlaifv-fb --output out/rlaifv-pairs --margin 1 --max-pairs-per-image 2
    mmcorpus rlaifv export --input out/rlaifv-pairs --output out/dpo --format trl,llamafactory
    mmcorpus rlaifv show --input out/rlaifv-fb --key KEY     # claims, questions, answers, scores

generate/feedback/pairs are Beam stages (ledger + manifest; skipped when up to date; unknown flags go
to Beam). Model answers are cached under ``--cache-dir`` (default ``rlaifv-cache`` beside ``--output``),
so a rerun after a crash pays only for what was never answered. API keys are read from the environment
variable named by ``--*-api-key-env`` (default OPENAI_API_KEY), never from a flag. Before a run the
number of requests, tokens, cost at ``--price-*`` and time at ``--est-latency-s`` are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import apache_beam as beam

from pipelines.runner import StageResult, add_stage_args, run_stage
from rewriter.client import ClientConfig
from rewriter.seed import CHARS_PER_TOKEN, token_cost
from schemas.errors import UserError
from schemas.records import KEPT
from schemas.rlaifv import META_KEY, PAIR_META_KEY, get_doc
from transforms.rlaifv import (
    FeedbackConfig,
    FeedbackFn,
    GenerateConfig,
    GenerateFn,
    PairsConfig,
    PairStatsFn,
    make_pairs,
)
from transforms.sources import read_sources, stage_inputs
from transforms.stage_io import ReadStage, read_manifest, read_table, stage_input_info

SUBCOMMANDS = ("generate", "feedback", "pairs", "export", "show")
EXPORT_FORMATS = ("trl", "llamafactory")


def _endpoint_args(p: argparse.ArgumentParser, name: str, max_tokens: int) -> None:
    # required, from the flag or the --config section (checked in main after merging them)
    p.add_argument(f"--{name}-endpoint", dest=f"{name}_endpoint",
                   help=f"OpenAI-compatible base URL of the {name} model (required)")
    p.add_argument(f"--{name}-model", dest=f"{name}_model", help=f"served {name} model name (required)")
    p.add_argument(f"--{name}-api-key-env", dest=f"{name}_api_key_env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (never the key itself)")
    p.add_argument(f"--{name}-max-tokens", dest=f"{name}_max_tokens", type=int, default=max_tokens)


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight per worker and endpoint")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request time-out (s)")
    p.add_argument("--max-retries", dest="max_retries", type=int, default=5)
    p.add_argument("--backoff-base", dest="backoff_base", type=float, default=0.5)
    p.add_argument("--cache-dir", dest="cache_dir", help="response cache (default rlaifv-cache beside --output; 'none')")
    p.add_argument("--price-input-per-mtok", dest="price_in", type=float, default=0.0)
    p.add_argument("--price-output-per-mtok", dest="price_out", type=float, default=0.0)
    p.add_argument("--est-latency-s", dest="est_latency", type=float, default=2.0,
                   help="assumed seconds per request for the time estimate")
    add_stage_args(p)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmcorpus rlaifv", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="n policy responses per (image, prompt)")
    _endpoint_args(g, "policy", 256)
    g.add_argument("--n", type=int, default=8)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", dest="top_p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--prompt-source", dest="prompt_source", choices=("qa", "pool"), default="qa")
    g.add_argument("--prompt-pool", dest="prompt_pool", help="text file, one prompt per line (default: built-in pool)")
    g.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    g.add_argument("--input", action="append", required=True,
                   help="[NAME=]a finished stage output directory (normally the dedup's); repeat with NAME=DIR")
    _client_args(g)
    f = sub.add_parser("feedback", help="claims → yes/no questions → labeler answers → scores")
    _endpoint_args(f, "claims", 512)
    _endpoint_args(f, "labeler", 16)
    f.add_argument("--max-claims", dest="max_claims", type=int, default=16)
    f.add_argument("--no-logprobs", dest="logprobs", action="store_false")
    f.add_argument("--expected-claims", dest="expected_claims", type=float, default=6.0,
                   help="claims per response assumed by the estimate")
    f.add_argument("--batch-size", dest="batch_size", type=int, default=4)
    # one generate output: its records already carry the dataset and NAME-KEY keys given at generate
    f.add_argument("--input", required=True, help="a finished `rlaifv generate` output")
    _client_args(f)
    q = sub.add_parser("pairs", help="DPO pairs within each response set")
    q.add_argument("--input", required=True)
    q.add_argument("--margin", type=int, default=1)
    q.add_argument("--max-pairs-per-image", dest="max_pairs_per_image", type=int, default=2,
                   help="0: no cap")
    q.add_argument("--max-length-ratio", dest="max_length_ratio", type=float, default=None)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--balance-lengths", dest="balance_lengths", action="store_true",
                   help="pick capped pairs alternately with the chosen answer shorter / longer (length bias)")
    add_stage_args(q)
    e = sub.add_parser("export", help="TRL DPO and LLaMA-Factory multimodal DPO files")
    e.add_argument("--input", required=True, help="a finished `rlaifv pairs` output")
    e.add_argument("--output", required=True)
    e.add_argument("--format", default="trl,llamafactory", help="comma list of trl, llamafactory")
    s = sub.add_parser("show", help="the audit document (responses, claims, questions, answers) of one key")
    s.add_argument("--input", required=True, help="an rlaifv generate / feedback / pairs output")
    s.add_argument("--key", required=True)
    p.set_defaults(_stages={"generate": g, "feedback": f, "pairs": q})
    return p


# --- --config FILE: [rlaifv.generate], [rlaifv.feedback], [rlaifv.pairs] ------------------------------

# Flags that name this run's data, not a setting: never read from a config file.
_NOT_CONFIGURABLE = {"input", "output", "config", "force", "help", "command", "_stages"}
_REQUIRED = {"generate": ("policy_endpoint", "policy_model"),
             "feedback": ("claims_endpoint", "claims_model", "labeler_endpoint", "labeler_model")}


def _check_value(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    """``value`` of config ``key`` as the flag would give it, or UserError naming the key."""
    def bad(expected: str):
        return UserError(f"{where} {key} = {value!r}: expected {expected}")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if action.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif action.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif action.type is None:
        if not isinstance(value, str):
            raise bad("a string")
    else:  # sizes such as --target-shard-bytes: what the flag accepts
        try:
            value = action.type(value if isinstance(value, str) else str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise bad(f"a value --{key.replace('_', '-')} accepts ({e})") from None
    if action.choices is not None and value not in action.choices:
        raise bad(f"one of {sorted(action.choices)}")
    return value


def config_defaults(path: str, command: str, sub: argparse.ArgumentParser) -> dict[str, Any]:
    """The ``[rlaifv.COMMAND]`` table of ``path`` as parser defaults (so flags still override it). Keys
    are the flags' long names with ``_`` (``policy_endpoint``, ``top_p``, ``max_pairs_per_image``);
    ``--no-logprobs`` is ``logprobs = false``. Unknown tables under ``[rlaifv]``, unknown keys and
    values of the wrong type are UserErrors naming them."""
    from pipelines.config import load_toml

    doc = load_toml(path)
    root = doc.get("rlaifv", {})
    if not isinstance(root, dict):
        raise UserError(f"config file {path}: rlaifv must be a table ([rlaifv.generate], [rlaifv.feedback], [rlaifv.pairs])")
    unknown_tables = sorted(k for k in root if k not in ("generate", "feedback", "pairs"))
    if unknown_tables:
        raise UserError(f"config file {path}: unknown [rlaifv] entr{'y' if len(unknown_tables) == 1 else 'ies'} "
                        f"{unknown_tables}; known tables: [rlaifv.generate], [rlaifv.feedback], [rlaifv.pairs]")
    table = root.get(command, {})
    where = f"config file {path} [rlaifv.{command}]"
    if not isinstance(table, dict):
        raise UserError(f"{where} must be a table")
    actions = {a.dest: a for a in sub._actions if a.dest not in _NOT_CONFIGURABLE and a.dest != argparse.SUPPRESS}
    unknown = sorted(k for k in table if k not in actions)
    if unknown:
        raise UserError(f"{where}: unknown setting(s) {unknown}; known: {sorted(actions)}")
    return {k: _check_value(actions[k], k, v, where) for k, v in table.items()}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Flags, then ``--config`` tables under them, then the defaults; required endpoints checked."""
    p = parser()
    args, beam_args = p.parse_known_args(argv)
    sub = args._stages.get(args.command)
    if sub is not None and args.config:
        sub.set_defaults(**config_defaults(args.config, args.command, sub))
        args, beam_args = p.parse_known_args(argv)
    missing = [k for k in _REQUIRED.get(args.command, ()) if not getattr(args, k)]
    if missing:
        raise UserError(f"rlaifv {args.command}: {', '.join('--' + k.replace('_', '-') for k in missing)} required "
                        f"(a flag, or {', '.join(missing)} in [rlaifv.{args.command}] of --config)")
    del args._stages
    return args, beam_args


def show(stage_dir: str, key: str) -> dict[str, Any]:
    """``meta["rlaifv"]`` (or ``meta["rlaifv_pairs"]``) of ``key`` in a stage output, else its ledger row."""
    try:
        table = read_table(stage_dir, columns=["key", "meta"])
    except FileNotFoundError as e:
        raise UserError(f"--input {stage_dir}: {e}") from None
    for row in table.to_pylist():
        if row["key"] == key:
            meta = json.loads(row["meta"] or "{}")
            return {k: meta[k] for k in (META_KEY, PAIR_META_KEY) if k in meta}
    for row in read_table(stage_dir, "ledger").to_pylist():
        if row["key"] == key:
            return {"ledger": row}
    raise UserError(f"--key {key} is not in {stage_dir} (neither kept nor in the ledger)")


def _cache_dir(args) -> str | None:
    if args.cache_dir is None:
        out = args.output.rstrip("/")
        return f"{out.rsplit('/', 1)[0] if '/' in out else '.'}/rlaifv-cache"
    return None if args.cache_dir.lower() == "none" else args.cache_dir


def _client(args, name: str, temperature: float = 0.0) -> ClientConfig:
    return ClientConfig(
        endpoint=getattr(args, f"{name}_endpoint"), model=getattr(args, f"{name}_model"),
        api_key_env=getattr(args, f"{name}_api_key_env"), concurrency=args.concurrency, timeout_s=args.timeout,
        max_retries=args.max_retries, backoff_base_s=args.backoff_base,
        backoff_max_s=max(args.backoff_base, 30.0), max_tokens=getattr(args, f"{name}_max_tokens"),
        temperature=temperature,
    )


def _input(args) -> dict[str, Any]:
    try:
        read_manifest(args.input)
    except FileNotFoundError as e:
        raise UserError(f"--input {args.input}: {e}") from None
    return stage_input_info(args.input)


def estimate(kind: str, records: int, args, image_tokens: int = 768, n: int = 8) -> dict[str, Any]:
    """Requests, tokens, USD and hours for a generate / feedback run over ``records`` records (``n``:
    responses per record for feedback, from the generate manifest)."""
    if kind == "generate":
        requests = records * args.n
        prompt = requests * (image_tokens + 16)
        out_exp = out_max = requests * args.policy_max_tokens
        out_exp = requests * min(150, args.policy_max_tokens)
    else:
        responses = records * n
        claims = args.expected_claims
        requests = int(responses * (2 + claims))
        text_prompt = int(responses * 2 * (60 + 600 / CHARS_PER_TOKEN))
        prompt = text_prompt + int(responses * claims * (image_tokens + 40))
        out_exp = int(responses * (2 * 12 * claims) + responses * claims * 6)
        out_max = responses * 2 * args.claims_max_tokens + int(responses * claims) * args.labeler_max_tokens
    est = token_cost(requests, prompt, out_exp, out_max, args.price_in, args.price_out)
    est["hours_at_concurrency"] = round(requests * args.est_latency / max(1, args.concurrency) / 3600, 3)
    return est


def print_estimate(kind: str, est: dict[str, Any], args) -> None:
    print(f"rlaifv {kind}: ~{est['requests']:,} requests, prompt tokens ~{est['prompt_tokens_est']:,}, "
          f"output tokens ~{est['output_tokens_expected']:,} (<= {est['output_tokens_max']:,}); "
          f"cost ${est['usd_expected']:.4f} expected, <= ${est['usd_max']:.4f} at "
          f"${args.price_in}/M in, ${args.price_out}/M out; ~{est['hours_at_concurrency']} h at "
          f"{args.est_latency}s/request and concurrency {args.concurrency} (cached answers are free)",
          file=sys.stderr)


def run(args: argparse.Namespace, beam_args: list[str]) -> StageResult | dict:
    if args.command == "show":
        return show(args.input, args.key)
    if args.command == "export":
        return export(args.input, args.output, [f.strip() for f in args.format.split(",") if f.strip()])
    sources = None
    if args.command == "generate":
        sources, info = stage_inputs(args.input)
    else:
        info = _input(args)
    if args.command == "generate":
        pool = None
        if args.prompt_pool:
            try:
                with open(args.prompt_pool, encoding="utf-8") as fh:
                    pool = tuple(line.strip() for line in fh if line.strip())
            except OSError as e:
                raise UserError(f"--prompt-pool {args.prompt_pool}: {e.strerror}; give a text file, one prompt a line")
        try:
            cfg = GenerateConfig(policy=_client(args, "policy"), n=args.n, temperature=args.temperature,
                                 top_p=args.top_p, seed=args.seed, prompt_source=args.prompt_source,
                                 cache_dir=_cache_dir(args), batch_size=args.batch_size,
                                 **({"prompt_pool": pool} if pool is not None else {}))
        except ValueError as e:
            raise UserError(str(e)) from None
        print_estimate("generate", estimate("generate", info.get("records") or 0, args), args)
        fn, stage = GenerateFn(cfg), "rlaifv_generate"
    elif args.command == "feedback":
        try:
            cfg = FeedbackConfig(claims=_client(args, "claims"), labeler=_client(args, "labeler"),
                                 max_claims=args.max_claims, logprobs=args.logprobs, cache_dir=_cache_dir(args),
                                 batch_size=args.batch_size)
        except ValueError as e:
            raise UserError(str(e)) from None
        n = int(read_manifest(args.input).config.get("rlaifv_generate", {}).get("n", 8))
        print_estimate("feedback", estimate("feedback", info.get("records") or 0, args, n=n), args)
        fn, stage = FeedbackFn(cfg), "rlaifv_feedback"
    else:
        try:
            cfg = PairsConfig(margin=args.margin, max_pairs_per_image=args.max_pairs_per_image or None,
                              max_length_ratio=args.max_length_ratio, seed=args.seed,
                              balance_lengths=args.balance_lengths)
        except ValueError as e:
            raise UserError(str(e)) from None

        def build_pairs(p):
            outcomes = (p | "Read" >> ReadStage(args.input)
                        | "Pairs" >> beam.FlatMap(make_pairs, cfg))
            stats = (outcomes
                     | "KeptPairs" >> beam.Filter(lambda o: o.status == KEPT)
                     | "PairDocs" >> beam.FlatMap(lambda o: get_doc(o.pair.meta, PAIR_META_KEY)["pairs"])
                     | "Stats" >> beam.CombineGlobally(PairStatsFn()))
            return outcomes, {"pair_stats": stats}

        return run_stage(stage="rlaifv_pairs", output_dir=args.output,
                         config={"rlaifv_pairs": dataclasses.asdict(cfg)}, input_info=info, build=build_pairs,
                         beam_args=beam_args, num_shards=args.num_shards, force=args.force)

    def build(p):
        pairs = read_sources(p, sources) if sources is not None else p | "Read" >> ReadStage(args.input)
        return (pairs
                | "Batch" >> beam.BatchElements(min_batch_size=cfg.batch_size, max_batch_size=cfg.batch_size)
                | "Call" >> beam.ParDo(fn))

    hashed = dataclasses.asdict(cfg)
    hashed.pop("cache_dir", None)  # where answers are cached does not change them
    return run_stage(stage=stage, output_dir=args.output, config={stage: hashed}, input_info=info, build=build,
                     beam_args=beam_args, num_shards=args.num_shards, force=args.force)


# --- export ----------------------------------------------------------------------------------


def _pair_rows(stage_dir: str) -> list[dict[str, Any]]:
    try:
        m = read_manifest(stage_dir)
    except FileNotFoundError as e:
        raise UserError(f"--input {stage_dir}: {e}") from None
    if m.stage != "rlaifv_pairs":
        raise UserError(f"--input {stage_dir} is a {m.stage!r} output; export reads an `rlaifv pairs` output")
    rows = read_table(stage_dir, columns=["key", "image", "image_format", "meta"]).to_pylist()
    return sorted(rows, key=lambda r: r["key"])


def export(stage_dir: str, output: str, formats: list[str]) -> dict[str, Any]:
    """Write the pairs as TRL DPO Parquet (``trl/train.parquet``: conversational ``prompt`` /
    ``chosen`` / ``rejected`` + ``images``, as trl-lib/rlaif-v) and LLaMA-Factory multimodal DPO
    (``llamafactory/rlaifv_dpo.json`` sharegpt ranking + ``images/`` + ``dataset_info.json``)."""
    unknown = set(formats) - set(EXPORT_FORMATS)
    if unknown or not formats:
        raise UserError(f"--format {','.join(formats)}: choose from {', '.join(EXPORT_FORMATS)}")
    rows = _pair_rows(stage_dir)
    written: dict[str, Any] = {"images": len(rows),
                               "pairs": sum(len(get_doc(r["meta"], PAIR_META_KEY)["pairs"]) for r in rows)}
    if "trl" in formats:
        import datasets

        records = []
        for r in rows:
            d = get_doc(r["meta"], PAIR_META_KEY)
            for pd in d["pairs"]:
                records.append({
                    "prompt": [{"role": "user", "content": [{"type": "image", "text": None},
                                                            {"type": "text", "text": d["prompt"]}]}],
                    "chosen": [{"role": "assistant", "content": [{"type": "text", "text": pd["chosen"]}]}],
                    "rejected": [{"role": "assistant", "content": [{"type": "text", "text": pd["rejected"]}]}],
                    "images": [{"bytes": r["image"], "path": None}],
                })
        msg = [{"role": datasets.Value("string"),
                "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}]
        features = datasets.Features({"prompt": msg, "chosen": msg, "rejected": msg,
                                      "images": datasets.Sequence(datasets.Image())})
        path = os.path.join(output, "trl", "train.parquet")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        datasets.Dataset.from_list(records, features=features).to_parquet(path)
        written["trl"] = path
    if "llamafactory" in formats:
        base = os.path.join(output, "llamafactory")
        os.makedirs(os.path.join(base, "images"), exist_ok=True)
        items = []
        for r in rows:
            d = get_doc(r["meta"], PAIR_META_KEY)
            ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(r["image_format"] or "", "bin")
            rel = f"images/{r['key']}.{ext}"
            with open(os.path.join(base, rel), "wb") as fh:
                fh.write(r["image"])
            for pd in d["pairs"]:
                items.append({"conversations": [{"from": "human", "value": "<image>" + d["prompt"]}],
                              "chosen": {"from": "gpt", "value": pd["chosen"]},
                              "rejected": {"from": "gpt", "value": pd["rejected"]},
                              "images": [rel]})
        with open(os.path.join(base, "rlaifv_dpo.json"), "w", encoding="utf-8") as fh:
            json.dump(items, fh, ensure_ascii=False, indent=1)
        info = {"rlaifv_dpo": {"file_name": "rlaifv_dpo.json", "formatting": "sharegpt", "ranking": True,
                               "columns": {"messages": "conversations", "chosen": "chosen",
                                           "rejected": "rejected", "images": "images"}}}
        with open(os.path.join(base, "dataset_info.json"), "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=1)
        written["llamafactory"] = os.path.join(base, "rlaifv_dpo.json")
    return written


def main(argv: list[str] | None = None) -> int:
    args, beam_args = parse_args(list(sys.argv[1:] if argv is None else argv))
    result = run(args, beam_args)
    if isinstance(result, dict):
        print(json.dumps(result, indent=1, ensure_ascii=False))
        return 0
    from pipelines.summary import print_stage_summary

    print_stage_summary(result, args.output)
    return 0


if __name__ == "__main__":
    from pipelines.cli import run_script

    run_script(main, "rlaifv")
