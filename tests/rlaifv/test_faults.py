"""Faults on all three endpoints (429 / 500 / hang / bad JSON) and bad inputs (undecodable image, empty
response, claim list failing the schema, labeler answer not yes/no) end as exact ledger outcomes."""

from __future__ import annotations

from pipelines import rlaifv as cli
from rewriter.standin import StandInServer
from schemas.records import Pair
from transforms.stage_io import read_table

from .responder import PHOTOS, respond

HORSE = (PHOTOS / "horse.png").read_bytes()


def _stage(tmp_path, specs):
    import helpers

    pairs = [Pair(key=k, image=img, caption="c", source=f"t#{k}",
                  qa=[{"question": q, "answer": "a"}] if q else None) for k, q, img in specs]
    return helpers.make_stage_dir(str(tmp_path / "in"), pairs, stage="dedup", num_shards=1)


def _ledger(d):
    return sorted((r["key"], r["status"], r["reason"]) for r in read_table(d, "ledger").to_pylist())


def _chain(tmp_path, inp, pol, clm, lab, extra=()):
    common = ["--num-shards", "1", "--cache-dir", str(tmp_path / "cache"), "--backoff-base", "0.01", *extra]
    assert cli.main(["generate", "--input", inp, "--output", str(tmp_path / "gen"), "--policy-endpoint",
                     pol.base_url, "--policy-model", "p", "--n", "2", *common]) == 0
    assert cli.main(["feedback", "--input", str(tmp_path / "gen"), "--output", str(tmp_path / "fb"),
                     "--claims-endpoint", clm.base_url, "--claims-model", "c", "--labeler-endpoint", lab.base_url,
                     "--labeler-model", "l", *common]) == 0
    return _ledger(str(tmp_path / "gen")), _ledger(str(tmp_path / "fb"))


def test_retryable_faults_on_every_endpoint_are_survived(tmp_path):
    """Every distinct request gets 429, then 500, then a hang, then an answer: all records kept, and each
    server saw exactly 4 attempts per distinct request."""
    inp = _stage(tmp_path, [("a", None, HORSE), ("b", None, (PHOTOS / "camera.png").read_bytes())])
    plan = {0: "http_429", 1: "http_500", 2: "hang"}
    servers = [StandInServer(respond_body=respond, plan=lambda c, a: plan.get(a), retry_after_s=0, hang_s=6)
               for _ in range(3)]
    for s in servers:
        s.start()
    try:
        pol, clm, lab = servers
        gen, fb = _chain(tmp_path, inp, pol, clm, lab, ["--max-retries", "3", "--timeout", "3"])
        assert gen == [("a", "kept", "ok"), ("b", "kept", "ok")]
        assert fb == [("a", "kept", "ok"), ("b", "kept", "ok")]
        # policy: 2 images x 2 seeds; claims: per image 2 claim lists + 2 question lists (seed 0: 1 claim,
        # seed 1: 2 claims); labeler: per image the distinct questions "photo", "wrong thing 0"
        for srv, distinct in ((pol, 4), (clm, 8), (lab, 4)):
            attempts = sorted(r.attempt for r in srv.seen)
            assert attempts == sorted([0, 1, 2, 3] * distinct), srv.base_url
            assert [r.fault for r in srv.seen if r.attempt == 3] == [None] * distinct
    finally:
        for s in servers:
            s.stop()


def test_unrecoverable_faults_and_bad_inputs_have_exact_reasons(tmp_path):
    specs = [
        ("ok", "What is shown?", HORSE),
        ("pol500", "POL500 what is shown?", HORSE),  # policy always 500 -> retries exhausted
        ("polbody", "POLBODY what is shown?", HORSE),  # policy 200 with a non-JSON body
        ("undecodable", "What is shown?", b"\x89PNG\r\n\x1a\n broken"),
        ("empty", "EMPTY what is shown?", HORSE),
        ("claimjson", "CLAIMJSON what is shown?", HORSE),  # claims answer content is not JSON
        ("claim429", "CLAIM429 what is shown?", HORSE),  # claims always 429 -> retries exhausted
        ("claimhang", "CLAIMHANG what is shown?", HORSE),  # claims always hang -> retries exhausted
        ("badclaims", "BADCLAIMS what is shown?", HORSE),  # {"claims": "x"}
        ("labfail", "LABFAIL what is shown?", HORSE),  # labeler: 200 with a non-JSON body
        ("maybe", "MAYBE what is shown?", HORSE),  # labeler answers "maybe"
    ]
    inp = _stage(tmp_path, specs)

    def pol_plan(c, a):
        return "http_500" if "POL500" in c else ("malformed_body" if "POLBODY" in c else None)

    def clm_plan(c, a):
        for marker, fault in (("CLAIMJSON", "malformed_json"), ("CLAIM429", "http_429"), ("CLAIMHANG", "hang")):
            if marker in c:
                return fault
        return None

    def lab_plan(c, a):
        return "malformed_body" if "labfail" in c else None

    servers = [StandInServer(respond_body=respond, plan=p, retry_after_s=0, hang_s=4)
               for p in (pol_plan, clm_plan, lab_plan)]
    for s in servers:
        s.start()
    try:
        gen, fb = _chain(tmp_path, inp, *servers, extra=["--max-retries", "1", "--timeout", "2"])
    finally:
        for s in servers:
            s.stop()
    assert gen == sorted([
        ("ok", "kept", "ok"), ("pol500", "error", "rewrite_exhausted_retries"),
        ("polbody", "rejected", "rewrite_invalid_json"), ("undecodable", "rejected", "rlaifv_image_undecodable"),
        ("empty", "rejected", "rlaifv_empty_response"), ("claimjson", "kept", "ok"), ("claim429", "kept", "ok"),
        ("claimhang", "kept", "ok"), ("badclaims", "kept", "ok"), ("labfail", "kept", "ok"), ("maybe", "kept", "ok"),
    ])
    assert fb == sorted([
        ("ok", "kept", "ok"), ("claimjson", "rejected", "rlaifv_claims_invalid"),
        ("claim429", "error", "rewrite_exhausted_retries"), ("claimhang", "error", "rewrite_exhausted_retries"),
        ("badclaims", "rejected", "rlaifv_claims_invalid"), ("labfail", "rejected", "rewrite_invalid_json"),
        ("maybe", "rejected", "rlaifv_answer_not_yes_no"),
    ])
    fb_rows = {r["key"]: r for r in read_table(str(tmp_path / "fb"), "ledger").to_pylist()}
    assert "claims:" in fb_rows["claim429"]["detail"] and "labeler:" in fb_rows["labfail"]["detail"]
