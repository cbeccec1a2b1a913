"""Inputs as the web serves them: image modes and orientation, animated and foreign formats, hostile and
compressed tar shards, non-UTF-8 names and fields, non-text captions, merged runs, empty inputs, and the
input fingerprint. Fixtures: tests/fixtures/make_real_world_inputs.py (committed output in real_world/)."""

from __future__ import annotations

import collections
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipelines import export
from pipelines import filter as filter_stage
from pipelines.verify import verify
from schemas import reasons
from schemas.errors import InputSchemaError
from transforms import images
from transforms.image_filters import ImageFilterConfig, image_filters
from transforms.filter_base import run_filters
from transforms.phash import dhash, hamming
from transforms.stage_io import read_manifest, read_table
from transforms.tokens import StageProfile, prepare_image
from schemas.records import Pair

HERE = pathlib.Path(__file__).resolve().parent
FIXTURES = HERE.parent / "fixtures"
REAL = FIXTURES / "real_world"
sys.path.insert(0, str(FIXTURES))
import make_real_world_inputs as rw  # noqa: E402

MMCORPUS = [sys.executable, "-m", "pipelines.cli"]
RED, BLUE, WHITE, BLACK, CYAN = rw.RED, rw.BLUE, (255, 255, 255), (0, 0, 0), (0, 255, 255)
PROFILE = StageProfile.for_stage(3)  # native size kept for these small images


def run_filter(out, *args):
    assert filter_stage.main(["--output", str(out), *args]) == 0
    return read_table(str(out), "ledger").to_pylist(), read_table(str(out)).to_pylist()


@pytest.fixture(scope="module")
def webdataset_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rw") / "filter"
    ledger, data = run_filter(out, "--input", str(REAL / "webdataset"), "--max-member-bytes", str(rw.MAX_MEMBER_BYTES))
    return out, ledger, {p["key"]: p for p in data}


def test_webdataset_every_sample_has_exactly_one_reason(webdataset_run):
    out, ledger, data = webdataset_run
    by_key = collections.defaultdict(list)
    for r in ledger:
        by_key[r["key"]].append((r["status"], r["reason"]))
    for key, want in rw.WEBDATASET_EXPECTED.items():
        assert want in by_key[key], (key, by_key[key])
    extra = collections.Counter((r["status"], r["reason"]) for r in ledger if r["key"] not in rw.WEBDATASET_EXPECTED)
    extra[("rejected", "duplicate_key")] = sum(r["reason"] == "duplicate_key" for r in ledger)
    assert dict(extra) == rw.WEBDATASET_EXTRA
    assert len(ledger) == len(rw.WEBDATASET_EXPECTED) + sum(rw.WEBDATASET_EXTRA.values())
    assert sorted(data) == sorted(k for k, v in rw.WEBDATASET_EXPECTED.items() if v[0] == "kept")
    details = {r["key"]: r["detail"] for r in ledger if r["reason"] != "duplicate_key"}
    for key, want in rw.WEBDATASET_DETAILS.items():
        assert details[key] == want, key
    # the animated GIF has its bytes: it is named as a format we do not take, never "missing"
    assert not any(r["reason"] == reasons.IMAGE_MISSING for r in ledger)
    bad_name = next(r for r in ledger if r["reason"] == reasons.MEMBER_NAME_INVALID_UTF8)
    assert bad_name["detail"] == "member name is not UTF-8: b'caf\\xe9.jpg'"
    assert bad_name["source"] == "00000.tar#000053:caf\\xe9.jpg"
    dup = next(r for r in ledger if r["reason"] == reasons.DUPLICATE_KEY)
    assert (dup["source"], dup["detail"]) == ("00002.tar#000000:000000009.jpg", "key first seen at 00000.tar#000027:000000009.jpg")
    unreadable = sorted((r["source"], r["detail"]) for r in ledger if r["reason"] == reasons.TAR_UNREADABLE)
    assert unreadable == [
        ("00010.tar", "ReadError: empty file"),
        ("00011.tar", "ReadError: invalid header"),
        ("00012.tar.zst", ".tar.zst compression is not read by mmcorpus: decompress to .tar (or recompress as .tar.gz)"),
    ]
    assert data["000000020"]["source"] == "00001.tar.gz#000000:000000020.jpg"
    assert all(ch.ok for ch in verify(str(out)))
    # no member was followed or written anywhere
    assert sorted(p.name for p in out.iterdir()) == ["data", "ledger", "manifest.json"]


def region(im: Image.Image, box) -> tuple[int, ...]:
    """Mean colour of a box well inside one flat region (JPEG edges excluded)."""
    a = np.asarray(im.convert("RGB").crop(box), dtype=float)
    return tuple(int(round(v)) for v in a.reshape(-1, 3).mean(axis=0))


def close(got, want, tol):
    return all(abs(g - w) <= tol for g, w in zip(got, want))


# key -> (upright size, [(box, colour)]): what a viewer shows, stated by construction in the generator.
UPRIGHT = {
    "000000000": ((320, 480), [((20, 20, 140, 140), RED), ((200, 300, 300, 460), BLUE)]),  # EXIF 6 applied
    "000000001": ((300, 300), [((20, 20, 130, 280), (255, 0, 0)), ((170, 20, 280, 280), BLACK)]),  # via its ICC profile
    "000000002": ((300, 300), [((20, 20, 130, 280), CYAN), ((170, 20, 280, 280), WHITE)]),  # no profile: naive
    "000000003": ((300, 300), [((10, 10, 90, 290), (255,) * 3), ((110, 10, 190, 290), (128,) * 3), ((210, 10, 290, 290), (37,) * 3)]),
    "000000004": ((300, 300), [((20, 20, 130, 280), WHITE), ((170, 20, 280, 280), RED)]),  # transparent index on white
    "000000005": ((300, 300), [((10, 10, 90, 290), WHITE), ((110, 10, 190, 290), (127,) * 3), ((210, 10, 290, 290), BLACK)]),
    "000000006": ((300, 300), [((20, 20, 130, 280), WHITE), ((170, 20, 280, 280), RED)]),  # alpha on white
}


def test_kept_images_are_annotated_upright(webdataset_run):
    _, _, data = webdataset_run
    for key, (size, _) in UPRIGHT.items():
        assert (data[key]["width"], data[key]["height"]) == size, key
    assert (data["000000009"]["width"], data["000000009"]["height"]) == (400, 300)  # progressive
    assert (data["000000010"]["width"], data["000000010"]["height"]) == (400, 300)  # broken APP1


@pytest.mark.parametrize("key", sorted(UPRIGHT))
def test_every_decoder_sees_the_upright_converted_picture(webdataset_run, key):
    _, _, data = webdataset_run
    raw = data[key]["image"]
    size, regions = UPRIGHT[key]
    decoded = images.decode(raw)
    assert decoded.mode == "RGB" and decoded.size == size
    for box, colour in regions:
        assert close(region(decoded, box), colour, 6), (key, box, region(decoded, box), colour)
    # pack re-encodes to JPEG (no EXIF, no alpha): a plain reader must see the same picture
    jpeg, w, h = prepare_image(raw, PROFILE)
    with Image.open(io.BytesIO(jpeg)) as stored:
        assert stored.size == (w, h) == size
        assert images.orientation(stored) == 1
        for box, colour in regions:
            assert close(region(stored, box), colour, 12), (key, box, region(stored, box), colour)


def test_dhash_is_taken_on_the_upright_picture():
    rotated = (REAL / "images" / "rotated.jpg").read_bytes()
    upright = (REAL / "images" / "upright.jpg").read_bytes()
    assert hamming(dhash(rotated), dhash(upright)) <= 2
    # and a sideways copy without the EXIF tag is a different picture
    with Image.open(io.BytesIO(rotated)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=92)
    assert hamming(dhash(buf.getvalue()), dhash(upright)) > 10


def test_export_hands_the_trainer_upright_rgb(webdataset_run, tmp_path):
    out, _, data = webdataset_run
    summary = export.export_minicpmv(str(out), str(tmp_path / "mv"))
    # copied byte for byte: plain RGB JPEGs without rotation; everything else re-encoded upright
    assert summary["normalised"] == ["000000000", "000000001", "000000002", "000000003", "000000004", "000000005", "000000006"]
    records = {r["id"]: r for r in json.loads((tmp_path / "mv" / "minicpmv.json").read_text())}
    for key, (size, regions) in UPRIGHT.items():
        path = tmp_path / "mv" / records[key]["image"]
        with Image.open(path) as im:  # what MiniCPM-V's finetune/dataset.py does
            rgb = im.convert("RGB")
            assert rgb.size == size and images.orientation(im) == 1
            for box, colour in regions:
                assert close(region(rgb, box), colour, 12), (key, box)
    assert (tmp_path / "mv" / records["000000009"]["image"]).read_bytes() == data["000000009"]["image"]


def test_animated_and_foreign_formats():
    chain = image_filters(ImageFilterConfig())
    gif = (REAL / "images" / "animated.gif").read_bytes()
    webp = (REAL / "images" / "animated.webp").read_bytes()
    heic = (REAL / "images" / "photo.heic").read_bytes()
    assert run_filters(Pair(key="k", image=gif), chain)[1:] == (
        "image_format", "GIF is not a format mmcorpus takes here (filter.image.allowed_formats = JPEG, PNG, WEBP)")
    assert run_filters(Pair(key="k", image=webp), chain)[1:] == ("image_animated", "WEBP with 3 frames: only still images are taken")
    assert run_filters(Pair(key="k", image=heic), chain)[1:] == ("image_format", "HEIC is not a format mmcorpus reads")
    # GIF allowed: an animated one is still refused as animated, not trained on its first frame
    gif_ok = image_filters(ImageFilterConfig(allowed_formats=("JPEG", "GIF")))
    assert run_filters(Pair(key="k", image=gif), gif_ok)[1:] == ("image_animated", "GIF with 3 frames: only still images are taken")
    keep_first = image_filters(ImageFilterConfig(reject_animated=False))
    assert run_filters(Pair(key="k", image=webp), keep_first)[1] is None



def test_remaining_modes_and_apng():
    """Modes the fixture tar does not carry: 32-bit I (16-bit range), F, PA; and an animated PNG."""
    i32 = Image.fromarray(np.array([[65535, 32896, 0, 70000]], dtype=np.int32))
    assert i32.mode == "I"
    assert list(images.to_rgb(i32).get_flattened_data()) == [(255,) * 3, (128,) * 3, (0,) * 3, (255,) * 3]
    f = Image.fromarray(np.array([[300.0, -5.0, 100.4]], dtype=np.float32))
    assert f.mode == "F"
    assert list(images.to_rgb(f).get_flattened_data()) == [(255,) * 3, (0,) * 3, (100,) * 3]
    pa_ = Image.new("PA", (2, 1))
    pa_.putpalette([*RED, *BLUE] + [0, 0, 0] * 254)
    pa_.putpixel((0, 0), (0, 0))
    pa_.putpixel((1, 0), (1, 255))
    assert list(images.to_rgb(pa_).get_flattened_data()) == [WHITE, BLUE]
    buf = io.BytesIO()
    Image.new("RGB", (300, 300), RED).save(buf, "PNG", save_all=True, append_images=[Image.new("RGB", (300, 300), BLUE)])
    assert run_filters(Pair(key="k", image=buf.getvalue()), image_filters(ImageFilterConfig()))[1:] == (
        "image_animated", "PNG with 2 frames: only still images are taken")


@pytest.mark.parametrize("ext, mode", [(".tar.bz2", "w:bz2"), (".tar.xz", "w:xz"), (".tgz", "w:gz"), (".tar", "w:gz")])
def test_other_compressed_shards_are_read(tmp_path, ext, mode):
    """Compression is detected from the bytes: a gzipped tar named .tar is read whole, not called cut."""
    d = tmp_path / "in"
    d.mkdir()
    with tarfile.open(d / f"00000{ext}", mode) as tf:
        for name, data in (("000000000.jpg", (REAL / "images" / "progressive.jpg").read_bytes()),
                           ("000000000.txt", b"a progressive photo of a red block on blue")):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), rw.MTIME
            tf.addfile(info, io.BytesIO(data))
    ledger, data = run_filter(tmp_path / "out", "--input", str(d))
    assert [(r["key"], r["status"], r["reason"]) for r in ledger] == [("000000000", "kept", "ok")]
    assert data[0]["source"] == f"00000{ext}#000000:000000000.jpg"


def test_camera_mpo_is_a_still_jpeg():
    """Phones and cameras write MPO: a JPEG whose primary picture is followed by a preview or depth
    map. Pillow calls it MPO with 2 frames; it is neither a foreign format nor an animation."""
    buf = io.BytesIO()
    rw.upright(400, 300).save(buf, "MPO", save_all=True, append_images=[Image.new("RGB", (160, 120), BLUE)])
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert (im.format, im.n_frames) == ("MPO", 2)
    pair, reason, _ = run_filters(Pair(key="k", image=buf.getvalue()), image_filters(ImageFilterConfig()))
    assert reason is None and (pair.image_format, pair.width, pair.height) == ("JPEG", 400, 300)


# Peak memory of the child itself: VmHWM, read by the child at exit. (ru_maxrss from wait4 is no good
# here: Linux carries the parent's high-water mark across fork+exec, and pytest's own is large.)
_HWM_WRAPPER = """
import atexit, os, runpy, sys
def _hwm():
    with open('/proc/self/status') as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
    with open(os.environ['MMCORPUS_TEST_HWM'], 'w') as f:
        f.write(str(kb * 1024))
atexit.register(_hwm)
kind, target, *rest = sys.argv[1:]
if kind == '-m':
    sys.argv = [target, *rest]
    runpy.run_module(target, run_name='__main__', alter_sys=True)
else:
    sys.argv = ['-c', *rest]
    exec(compile(target, '<test>', 'exec'), {'__name__': '__main__'})
"""


def run_measured(kind: str, target: str, args: list[str], tmp: pathlib.Path) -> tuple[int, str, str, int]:
    """Run ``python -m target args`` (kind ``-m``) or ``python -c target args`` (kind ``-c``); return
    (exit code, stdout, stderr, peak resident memory of that process in bytes)."""
    hwm = tmp / "hwm.txt"
    env = dict(os.environ, MMCORPUS_TEST_HWM=str(hwm))
    proc = subprocess.run([sys.executable, "-c", _HWM_WRAPPER, kind, target, *args], capture_output=True,
                          text=True, timeout=900, env=env)
    return proc.returncode, proc.stdout, proc.stderr, int(hwm.read_text()) if hwm.exists() else -1


def test_huge_but_legal_jpeg_is_decoded_at_a_bounded_size(tmp_path):
    """8000x6000 (48 Mpx, under the default max_pixels): filter, dHash and pack never hold it whole
    (a full RGB decode alone is 144 MB)."""
    w, h = 8000, 6000
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[: h // 3, : w // 2] = RED
    a[h // 3 :, :] = BLUE
    path = tmp_path / "huge.jpg"
    Image.fromarray(a).save(path, "JPEG", quality=80)
    del a
    code = (
        "import sys, pathlib\n"
        "from transforms.image_filters import ImageFilterConfig, image_filters\n"
        "from transforms.filter_base import run_filters\n"
        "from transforms.phash import dhash\n"
        "from transforms.tokens import StageProfile, prepare_image\n"
        "from schemas.records import Pair\n"
        "data = pathlib.Path(sys.argv[1]).read_bytes()\n"
        "if sys.argv[2] == 'baseline': print('None', 8000, 6000, 1549, 1161, True); sys.exit()\n"
        "pair, reason, _ = run_filters(Pair(key='k', image=data), image_filters(ImageFilterConfig()))\n"
        "jpeg, sw, sh = prepare_image(data, StageProfile.for_stage(3))\n"
        "print(reason, pair.width, pair.height, sw, sh, dhash(data) != 0)\n"
    )
    rc, _, stderr, base = run_measured("-c", code, [str(path), "baseline"], tmp_path)
    assert rc == 0, stderr[-2000:]
    rc, stdout, stderr, rss = run_measured("-c", code, [str(path), "decode"], tmp_path)
    assert rc == 0, stderr[-2000:]
    reason, pw, ph, sw, sh, hashed = stdout.split()
    assert (reason, int(pw), int(ph), hashed) == ("None", w, h, "True")
    assert int(sw) * int(sh) <= PROFILE.max_slices * PROFILE.resolution**2 and int(sw) / int(sh) == pytest.approx(w / h, rel=0.01)
    # same imports, same bytes read, no decode: the difference is what decoding cost
    assert base > 0 and rss - base < 64 << 20, f"decoding took {(rss - base) >> 20} MiB"
    # and past max_pixels nothing is decoded at all
    with pytest.raises(images.TooManyPixels, match=r"8000x6000 = 48000000 pixels > 40000000"):
        images.decode(path.read_bytes(), max_pixels=40_000_000)


def sparse_tar(path: pathlib.Path, big: int) -> None:
    """A tar whose first sample's .jpg member is ``big`` bytes of zeros (a sparse file: no disk, no RAM)."""
    with open(path, "wb") as f:
        info = tarfile.TarInfo("000000000.jpg")
        info.size = big
        info.mtime = rw.MTIME
        f.write(info.tobuf(format=tarfile.GNU_FORMAT))
        f.seek(big + (-big % 512), 1)
        for name, data in (("000000000.txt", b"a member far larger than any image"),
                           ("000000001.jpg", (REAL / "images" / "progressive.jpg").read_bytes()),
                           ("000000001.txt", b"a progressive photo of a red block on blue")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = rw.MTIME
            f.write(info.tobuf(format=tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512))
        f.write(b"\0" * 1024)


def test_oversized_member_is_skipped_unread(tmp_path):
    """A 2 GiB member under the default 64 MiB cap: one member_too_large row, the next sample kept,
    and the worker's peak memory far below the member's size."""
    shard = tmp_path / "in" / "00000.tar"
    shard.parent.mkdir()
    sparse_tar(shard, 2 << 30)
    out = tmp_path / "out"
    rc, _, stderr, rss = run_measured("-m", "pipelines.cli", ["filter", "--input", str(shard.parent), "--output", str(out)], tmp_path)
    assert rc == 0, stderr[-2000:]
    ledger = sorted(read_table(str(out), "ledger").to_pylist(), key=lambda r: r["key"])
    assert [(r["key"], r["status"], r["reason"], r["detail"]) for r in ledger] == [
        ("000000000", "rejected", "member_too_large", "'000000000.jpg' is 2147483648 bytes > max_member_bytes 67108864"),
        ("000000001", "kept", "ok", ""),
    ]
    assert 0 < rss < 1 << 30, f"peak RSS {rss >> 20} MiB"


def test_many_members_under_one_key_count_against_the_cap(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    members = [(f"000000000.x{i}", rw.noise(40_000, i)) for i in range(5)] + [("000000000.txt", b"a sample of many parts")]
    members += [("000000001.jpg", (REAL / "images" / "progressive.jpg").read_bytes()), ("000000001.txt", b"a progressive photo of a red block")]
    (d / "00000.tar").write_bytes(rw.tar_of(members))
    ledger, _ = run_filter(tmp_path / "out", "--input", str(d), "--max-member-bytes", "100000")
    assert sorted((r["key"], r["reason"], r["detail"]) for r in ledger) == [
        ("000000000", "member_too_large", "sample '000000000': members add up to more than max_member_bytes 100000"),
        ("000000001", "ok", ""),
    ]


def test_truncated_tar_gz_is_a_ledger_row(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    whole = (REAL / "webdataset" / "00001.tar.gz").read_bytes()
    (d / "00001.tar.gz").write_bytes(whole[: len(whole) // 2])
    ledger, data = run_filter(tmp_path / "out", "--input", str(d))
    assert [(r["status"], r["reason"]) for r in ledger] == [("error", "tar_truncated")]
    assert ledger[0]["detail"] == "000000020.jpg: ReadError: unexpected end of data"
    assert data == []


@pytest.mark.parametrize("how", ["directory", "glob"])
def test_two_img2dataset_runs_merged_reuse_keys(tmp_path, how):
    src = str(REAL / "merged_runs") if how == "directory" else str(REAL / "merged_runs" / "*" / "*.tar")
    ledger, data = run_filter(tmp_path / "out", "--input", src)
    assert collections.Counter((r["status"], r["reason"]) for r in ledger) == rw.MERGED_EXPECTED
    dups = sorted((r["key"], r["source"], r["detail"]) for r in ledger if r["reason"] == reasons.DUPLICATE_KEY)
    assert dups == [
        ("000000000", "run2/00000.tar#000000:000000000.jpg", "key first seen at run1/00000.tar#000000:000000000.jpg"),
        ("000000001", "run2/00000.tar#000002:000000001.jpg", "key first seen at run1/00000.tar#000002:000000001.jpg"),
    ]
    assert sorted(p["caption"] for p in data) == [
        "the first run's photo number 0 of a red block", "the first run's photo number 1 of a red block"]


def test_tables_with_bad_fields_and_non_text_captions(tmp_path):
    out = tmp_path / "out"
    ledger, data = run_filter(out, "--input", str(REAL / "tables"))
    got = collections.defaultdict(list)
    for r in sorted(ledger, key=lambda r: r["source"]):
        name, row = r["source"].split("#")
        got[name].append((row, r["status"], r["reason"]))
    assert dict(got) == rw.TABLES_EXPECTED
    details = {r["source"]: r["detail"] for r in ledger}
    assert details["fields.csv#00000002"] == "field 'url': 25 bytes, starts b'http://127.0.0.1/caf\\xe9.jpg'"
    assert details["fields.csv#00000003"] == "field 'photographer': 4 bytes, starts b'Jos\\xe9'"
    assert details["int_caption.parquet#00000000"] == "int: 7"
    assert details["list_caption.parquet#00000000"] == "list: ['a', 'cat']"
    assert details["rows.jsonl#00000002"] == "dict: {'en': 'a dog on a beach'}"
    assert sorted(p["caption"] for p in data) == [
        "a brown dog running on a sandy beach", "a row of bicycles parked by a canal",
        "a wooden boat moored in a quiet harbour", "a yellow tram crossing a bridge at dusk"]
    assert all(ch.ok for ch in verify(str(out)))


def test_empty_input_directory_exits_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"hidden")
    proc = subprocess.run([*MMCORPUS, "filter", "--input", str(empty), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"input directory '{empty}' has no files (hidden files are ignored)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_non_utf8_file_name_stops_before_work(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "good.csv").write_text("url,caption\nhttp://127.0.0.1/1.jpg,a boat in a harbour\n")
    with open(os.path.join(os.fsencode(d), b"caf\xe9.csv"), "wb") as f:
        f.write(b"url,caption\nhttp://127.0.0.1/2.jpg,a cafe on a corner\n")
    proc = subprocess.run([*MMCORPUS, "filter", "--input", str(d), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"{d}/caf\\xe9.csv: file name is not UTF-8 (1 such file(s)); rename it" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_utf16_csv_stops_with_the_fix(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_bytes("url,caption\nhttp://127.0.0.1/1.jpg,a boat in a harbour\n".encode("utf-16"))
    with pytest.raises(InputSchemaError) as err:
        filter_stage.main(["--input", str(path), "--output", str(tmp_path / "out")])
    assert str(err.value) == (f"{path}: the file is UTF-16 (it starts with a UTF-16 byte-order mark); mmcorpus reads UTF-8: "
                              "re-encode it, e.g. iconv -f UTF-16 -t UTF-8 IN > OUT")


@pytest.mark.parametrize("layout", ["table", "status"])
def test_a_file_named_parquet_that_is_not_one_stops_before_work(tmp_path, layout):
    d = tmp_path / "in"
    d.mkdir()
    if layout == "status":  # img2dataset status file next to a good tar
        shutil.copy(REAL / "webdataset" / "00002.tar", d / "00000.tar")
    (d / "00000.parquet").write_bytes(b"this is not a parquet file\n")
    with pytest.raises(InputSchemaError) as err:
        filter_stage.main(["--input", str(d), "--output", str(tmp_path / "out")])
    assert str(err.value) == (
        f"{d}/00000.parquet: not a readable Parquet file (ArrowInvalid: Parquet magic bytes not found in footer. "
        "Either the file is corrupted or this is not a parquet file.); replace it or move it out of the input")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["header_only.csv", "empty_archive"])
def test_zero_record_input_writes_empty_outputs_and_a_manifest(tmp_path, source):
    if source == "empty_archive":
        src = tmp_path / "in"
        src.mkdir()
        shutil.copy(REAL / "webdataset" / "00013.tar", src / "00000.tar")
    else:
        src = REAL / "zero_records" / source
    out = tmp_path / "out"
    ledger, data = run_filter(out, "--input", str(src))
    assert ledger == [] and data == []
    m = read_manifest(str(out))
    assert m.counts["ledger_rows"] == 0 and m.counts["outputs"] == 0
    assert all(ch.ok for ch in verify(str(out)))


def _bump_mtime(path: pathlib.Path, seconds: int) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_fingerprint_notices_an_edit_in_the_middle(tmp_path):
    """Same size, first and last MiB untouched: the old edge-only fingerprint called this up to date."""
    src = tmp_path / "captions.csv"
    rows = [f"http://127.0.0.1/{i}.jpg,a photo of a red boat number {i} in a harbour,{'n' * 100_000}" for i in range(40)]
    raw = bytearray(("url,caption,notes\n" + "\n".join(rows) + "\n").encode())
    assert len(raw) > 3 << 20  # a real middle, outside the first and last MiB
    src.write_bytes(bytes(raw))
    args = ["--input", str(src)]
    out = str(tmp_path / "out")
    run_filter(out, *args)
    middle = raw.index(b"nnnn", len(raw) // 2)
    raw[middle : middle + 1] = b"N"
    src.write_bytes(bytes(raw))
    _bump_mtime(src, 5)  # what any write does; set explicitly so a coarse clock cannot hide it
    result = filter_stage.run(filter_stage.parser().parse_known_args(["--output", out, *args])[0], [])
    assert not result.skipped
    again = filter_stage.run(filter_stage.parser().parse_known_args(["--output", out, *args])[0], [])
    assert again.skipped
    # content mode: even an edit whose mtime was put back (cp -p, touch -r) is noticed
    content = [*args, "--fingerprint", "content"]
    assert not filter_stage.run(filter_stage.parser().parse_known_args(["--output", out, *content])[0], []).skipped
    before = src.stat().st_mtime_ns
    raw[middle : middle + 1] = b"n"
    src.write_bytes(bytes(raw))
    os.utime(src, ns=(before, before))
    assert not filter_stage.run(filter_stage.parser().parse_known_args(["--output", out, *content])[0], []).skipped
    manifest = read_manifest(out)
    assert manifest.input["fingerprint_mode"] == "content" and len(manifest.input["files"][0]["sha256"]) == 64


def test_parquet_fingerprint_includes_its_footer(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transforms.ingest import InputSpec, fingerprint, resolve_input

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"url": ["u"], "caption": ["a cat on a mat"]}), path)
    info = fingerprint(resolve_input(InputSpec(str(path))))
    entry = info["files"][0]
    assert info["fingerprint_mode"] == "stat" and set(entry) == {"path", "bytes", "mtime_ns", "edge_sha256", "footer_sha256"}
    footer_len = int.from_bytes(path.read_bytes()[-8:-4], "little")
    import hashlib

    assert entry["footer_sha256"] == hashlib.sha256(path.read_bytes()[-8 - footer_len :]).hexdigest()
