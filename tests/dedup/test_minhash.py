"""MinHash, shingling, banding and bucket linking: exact values, and datasketch compatibility."""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
from datasketch import LeanMinHash, MinHash, MinHashLSH

from bench.dedup_data import synthetic_captions
from transforms import minhash as mh
from transforms.dedup import DedupConfig, link_bucket


def test_normalize_caption_folds_case_punctuation_whitespace():
    assert mh.normalize_caption("  The DOG, on  the beach!! ") == "the dog on the beach"
    assert mh.normalize_caption("A Dog -- on the Beach!!") == mh.normalize_caption("a dog on the beach")
    assert mh.normalize_caption("Ｆｕｌｌｗｉｄｔｈ\tTEXT") == "fullwidth text"  # NFKC
    assert mh.normalize_caption("café №5 $10") == "café no5 10"
    assert mh.normalize_caption("Straße") == "strasse"  # casefold
    assert mh.normalize_caption(None) == "" and mh.normalize_caption("?!") == ""


def test_shingles_word_and_char():
    assert mh.shingles("a dog on the beach", "word", 2) == ["a dog", "dog on", "on the", "the beach"]
    assert mh.shingles("a dog", "word", 3) == ["a dog"]  # shorter than n: itself
    assert mh.shingles("abcab", "char", 3) == ["abc", "bca", "cab"]
    assert mh.shingles("a a a a", "word", 1) == ["a"]  # distinct only
    assert mh.shingles("", "word", 2) == []
    with pytest.raises(ValueError):
        mh.shingles("x", "syllable", 2)


def _real_like_captions(n=300, seed=3):
    rng = random.Random(seed)
    words = "a the dog cat red blue car house on in at with beach city night photo of stock view".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 20))) for _ in range(n)]


def test_signatures_bit_identical_to_datasketch_and_lean_minhash_estimates_agree():
    hasher = mh.MinHasher(num_perm=128, seed=7)
    caps = _real_like_captions()
    sh = [mh.shingles(mh.normalize_caption(c), "word", 2) for c in caps]
    sigs = hasher.signatures(sh)
    assert sigs.shape == (len(caps), 128) and sigs.dtype == np.uint32
    ref = MinHash.bulk([[s.encode() for s in x] for x in sh], num_perm=128, seed=7, hashfunc=mh.hash32)
    for ours, theirs in zip(sigs, ref):
        assert theirs.scheme == mh.SCHEME
        np.testing.assert_array_equal(ours, theirs.hashvalues)
    leans = [LeanMinHash(seed=7, hashvalues=s, scheme=mh.SCHEME) for s in sigs[:40]]
    for i in range(40):
        for j in range(i + 1, 40):
            assert leans[i].jaccard(leans[j]) == mh.estimate_jaccard(sigs[i], sigs[j])
            assert leans[i].jaccard(leans[j]) == ref[i].jaccard(ref[j])


def test_signatures_chunking_does_not_change_values(monkeypatch):
    caps = _real_like_captions(200, seed=5)
    sh = [mh.shingles(mh.normalize_caption(c), "char", 4) for c in caps] + [[]]
    whole = mh.MinHasher(64, 1).signatures(sh)
    small = mh.MinHasher(64, 1)
    small.MAX_MATRIX_ELEMS = 64 * 7  # forces many chunks
    np.testing.assert_array_equal(small.signatures(sh), whole)
    assert (whole[-1] == mh.EMPTY_HASH).all()


def test_row_kernel_chunks_and_empty_rows_bit_identical_to_datasketch():
    # rows of up to hundreds of shingles reduced 7 at a time, empty rows first, between and last: every
    # signature equals datasketch's own MinHash of the same shingles (an independent implementation)
    caps = _real_like_captions(60, seed=11)
    sh = [[]] + [mh.shingles(mh.normalize_caption(c), "char", 3) for c in caps[:30]] + [[], ["x"]]
    sh += [mh.shingles(mh.normalize_caption(c), "char", 3) for c in caps[30:]] + [[]]
    small = mh.MinHasher(64, 3)
    small.MAX_MATRIX_ELEMS = 64 * 7
    assert max(len(x) for x in sh) > 7 * 8  # rows of 9 chunks and more
    ref = MinHash.bulk([[s.encode() for s in x] for x in sh], num_perm=64, seed=3, hashfunc=mh.hash32)
    for sig_small, sig_whole, theirs in zip(small.signatures(sh), mh.MinHasher(64, 3).signatures(sh), ref):
        np.testing.assert_array_equal(sig_small, theirs.hashvalues)
        np.testing.assert_array_equal(sig_whole, theirs.hashvalues)
    assert (small.signatures([[]])[0] == np.uint32(0xFFFFFFFF)).all()
    assert small.signatures([]).shape == (0, 64)


def test_estimates_track_true_jaccard():
    a = set(range(0, 100))
    b = set(range(30, 130))  # J = 70 / 130
    h = mh.MinHasher(256, 1)
    sa, sb = h.signatures([[str(x) for x in a], [str(x) for x in b]])
    assert abs(mh.estimate_jaccard(sa, sb) - 70 / 130) < 0.08
    assert abs(mh.bbit_jaccard(mh.bbit_sketch(sa), mh.bbit_sketch(sb)) - 70 / 130) < 0.08
    assert mh.bbit_jaccard(mh.bbit_sketch(sa), mh.bbit_sketch(sa)) == 1.0


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
def test_band_parameters_are_datasketchs(threshold):
    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    assert mh.optimal_bands(threshold, 128) == (lsh.b, lsh.r)
    assert DedupConfig(near_caption_threshold=threshold).lsh_params() == (lsh.b, lsh.r)


def test_known_bands_table_is_datasketchs_search():
    from datasketch.lsh import _optimal_param

    assert (0.7, 128, 0.5, 0.5) in mh.KNOWN_BANDS  # the default config's entry
    for (threshold, num_perm, fp, fn), bands_rows in mh.KNOWN_BANDS.items():
        assert bands_rows == tuple(int(x) for x in _optimal_param(threshold, num_perm, fp, fn))
    assert mh.optimal_bands(0.65, 128) == tuple(int(x) for x in _optimal_param(0.65, 128, 0.5, 0.5))


def test_band_keys_equal_for_equal_bands_only():
    sig = np.arange(128, dtype=np.uint32)
    other = sig.copy()
    other[0] += 1  # changes band 0 only
    ka, kb = mh.band_keys(sig, 14, 9), mh.band_keys(other, 14, 9)
    assert len(ka) == 14 and ka[0] != kb[0] and ka[1:] == kb[1:]
    assert len({k[:2] for k in ka}) == 14  # band index prefix keeps bands apart


def test_link_bucket_star_identical_and_verified():
    members = [("k3", None), ("k1", None), ("k2", None), ("k1", None)]
    assert link_bucket(members, None, 64) == [("k2", "k1"), ("k3", "k1")]
    same = lambda a, b: abs(a - b) <= 1  # noqa: E731
    # k1=0, k2=0 (identical payload), k3=1 (similar to 0), k4=5 (alone), k5=6 (similar to 5)
    members = [("k1", 0), ("k2", 0), ("k3", 1), ("k4", 5), ("k5", 6)]
    assert link_bucket(members, same, 64) == [("k2", "k1"), ("k3", "k1"), ("k5", "k4")]
    # compare budget: k3 may only look at the first distinct payload
    assert link_bucket([("a", 5), ("b", 0), ("c", 1)], same, 1) == []


def test_config_validation():
    with pytest.raises(ValueError):
        DedupConfig(shingle="syllable")
    with pytest.raises(ValueError):
        DedupConfig(bands=10)
    with pytest.raises(ValueError):
        DedupConfig(bands=20, rows=9)  # 180 > num_perm
    with pytest.raises(ValueError):
        DedupConfig(near_caption_threshold=1.5)
    with pytest.raises(ValueError):
        DedupConfig(near_image_max_hamming=40)
    with pytest.raises(ValueError):
        DedupConfig(max_rounds=1)
    assert DedupConfig(near_caption_threshold=None).lsh_params() == (0, 0)


def test_config_from_toml(tmp_path):
    from schemas.errors import UserError

    path = tmp_path / "c.toml"
    path.write_text('[other]\nx = 1\n[dedup]\nshingle = "word"\nngram = 3\nnear_image_max_hamming = false\n'
                    'verify_min_jaccard = false\n')
    cfg = DedupConfig.from_toml(str(path))
    assert cfg == DedupConfig(shingle="word", ngram=3, near_image_max_hamming=None, verify_min_jaccard=None)
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert DedupConfig.from_toml(str(empty)) == DedupConfig()
    path.write_text("[dedup]\nngram = 0\n")
    with pytest.raises(UserError, match="ngram must be >= 1"):
        DedupConfig.from_toml(str(path))
    with pytest.raises(UserError, match="file not found"):
        DedupConfig.from_toml(str(tmp_path / "missing.toml"))
    path.write_text("[dedup\n")
    with pytest.raises(UserError, match="not valid TOML"):
        DedupConfig.from_toml(str(path))


def test_shingle_hashes_are_the_crc32_of_the_shingles():
    # the batch path (numpy CRC-32 over every character window of ASCII captions) hashes the same set of
    # shingles as zlib.crc32 over shingles(): the same signatures
    caps, _ = synthetic_captions(400, seed=9)
    norms = [mh.normalize_caption(c) for c in caps] + [
        "", "abc", "abcde", "abcdef", "aaaaaaaaaaaa", "日本語のキャプションです", "café au lait près de la gare", "a b"]
    hasher = mh.MinHasher(128, 1)
    for kind, n in (("char", 5), ("char", 3), ("char", 1), ("word", 2)):
        flat, counts = mh.shingle_hashes(norms, kind, n)
        assert len(counts) == len(norms) and int(counts.sum()) == len(flat)
        start = 0
        for c, k in zip(norms, counts.tolist()):
            assert set(flat[start:start + k].tolist()) == {zlib.crc32(s.encode("utf-8")) for s in mh.shingles(c, kind, n)}, (kind, n, c)
            start += k
        want = hasher.signatures([mh.shingles(c, kind, n) for c in norms])
        assert (hasher.signatures_from_hashes(flat, counts) == want).all()
    flat, counts = mh.shingle_hashes(["abcdefgh"], "char", 5)  # 4 windows, hashed by hand with zlib
    assert flat.tolist() == [zlib.crc32(b"abcde"), zlib.crc32(b"bcdef"), zlib.crc32(b"cdefg"), zlib.crc32(b"defgh")]
