"""Packed training shards: the pack Arrow schema, WebDataset member names and index.json layout."""

from __future__ import annotations

import pyarrow as pa

# --- files -----------------------------------------------------------------------------------
PACK_DIR = "data"  # pack shards live under the stage's data/ dir (cleared by the runner on rerun)
INDEX_NAME = "index.json"
INDEX_FORMAT = "mmcorpus-packs/1"
FILE_KIND_PACK = "pack"
FILE_KIND_INDEX = "index"
FORMAT_PARQUET = "parquet"
FORMAT_WEBDATASET = "webdataset"
FORMATS = (FORMAT_PARQUET, FORMAT_WEBDATASET)
SHARD_EXT = {FORMAT_PARQUET: "parquet", FORMAT_WEBDATASET: "tar"}


def pack_shard_name(index: int, fmt: str) -> str:
    """``packs-00000.parquet`` / ``packs-00000.tar``: shards numbered from 0 without gaps, so a brace
    pattern (``packs-{00000..00041}.tar``) names them all."""
    return f"packs-{index:05d}.{SHARD_EXT[fmt]}"


def pack_id(partition: int, index: int) -> str:
    """Pack key: no dots (WebDataset splits the extension at the first dot), no slashes."""
    return f"p{partition:05d}-{index:07d}"


# --- one pack (one Parquet row / one WebDataset member group) --------------------------------
PACK_ID = "pack_id"
SEQ_LEN = "seq_len"  # the configured sequence length (a pack holds num_tokens <= seq_len)
NUM_TOKENS = "num_tokens"
NUM_SAMPLES = "num_samples"
INPUT_IDS = "input_ids"
LABELS = "labels"  # -100 on image placeholders and on the first token of every sample
POSITION_IDS = "position_ids"  # restart at 0 for every sample
CU_SEQLENS = "cu_seqlens"  # [0, l1, l1+l2, ..., num_tokens]
SAMPLE_KEYS = "sample_keys"
TRUNCATED_TOKENS = "truncated_tokens"  # tokens cut off the last sample (greedy_truncate only)
IMAGES = "images"  # JPEG bytes, resized per stage profile
IMAGE_SAMPLE = "image_sample"  # index of the sample (segment) an image belongs to
IMAGE_OFFSET = "image_offset"  # first token of the image's placeholder span within the pack
IMAGE_LENGTH = "image_length"  # tokens in the span (overview + slices + their special tokens)
IMAGE_WIDTH = "image_width"  # size of the stored (resized) image
IMAGE_HEIGHT = "image_height"
IMAGE_GRID_COLS = "image_grid_cols"  # slice grid; 0 x 0 = not sliced (overview only)
IMAGE_GRID_ROWS = "image_grid_rows"

IGNORE_INDEX = -100

_i32 = pa.int32()
PACK_SCHEMA = pa.schema(
    [
        pa.field(PACK_ID, pa.string(), nullable=False),
        pa.field(SEQ_LEN, _i32, nullable=False),
        pa.field(NUM_TOKENS, _i32, nullable=False),
        pa.field(NUM_SAMPLES, _i32, nullable=False),
        pa.field(INPUT_IDS, pa.list_(_i32), nullable=False),
        pa.field(LABELS, pa.list_(_i32), nullable=False),
        pa.field(POSITION_IDS, pa.list_(_i32), nullable=False),
        pa.field(CU_SEQLENS, pa.list_(_i32), nullable=False),
        pa.field(SAMPLE_KEYS, pa.list_(pa.string()), nullable=False),
        pa.field(TRUNCATED_TOKENS, _i32, nullable=False),
        pa.field(IMAGES, pa.list_(pa.binary()), nullable=False),
        pa.field(IMAGE_SAMPLE, pa.list_(_i32), nullable=False),
        pa.field(IMAGE_OFFSET, pa.list_(_i32), nullable=False),
        pa.field(IMAGE_LENGTH, pa.list_(_i32), nullable=False),
        pa.field(IMAGE_WIDTH, pa.list_(_i32), nullable=False),
        pa.field(IMAGE_HEIGHT, pa.list_(_i32), nullable=False),
        pa.field(IMAGE_GRID_COLS, pa.list_(_i32), nullable=False),
        pa.field(IMAGE_GRID_ROWS, pa.list_(_i32), nullable=False),
    ]
)
PACK_ARRAY_FIELDS = (INPUT_IDS, LABELS, POSITION_IDS, CU_SEQLENS)  # int32 token-level arrays
PACK_IMAGE_FIELDS = (IMAGE_SAMPLE, IMAGE_OFFSET, IMAGE_LENGTH, IMAGE_WIDTH, IMAGE_HEIGHT, IMAGE_GRID_COLS, IMAGE_GRID_ROWS)

# --- WebDataset: one member group per pack, key = pack_id ------------------------------------
# Token arrays as .npy (int32, decoded by webdataset's default handlers); everything else in .json;
# images as img000.jpg, img001.jpg ... in image order.
WDS_EXT_INPUT_IDS = "input_ids.npy"
WDS_EXT_LABELS = "labels.npy"
WDS_EXT_POSITION_IDS = "position_ids.npy"
WDS_EXT_CU_SEQLENS = "cu_seqlens.npy"
WDS_EXT_META = "json"  # pack_id, seq_len, num_tokens, num_samples, sample_keys, truncated_tokens, image_*
WDS_ARRAY_EXTS = {
    INPUT_IDS: WDS_EXT_INPUT_IDS,
    LABELS: WDS_EXT_LABELS,
    POSITION_IDS: WDS_EXT_POSITION_IDS,
    CU_SEQLENS: WDS_EXT_CU_SEQLENS,
}
WDS_TAR_MTIME = 0  # fixed member mtime: byte-identical tars on rerun


def wds_image_ext(i: int) -> str:
    return f"img{i:03d}.jpg"


# --- index.json --------------------------------------------------------------------------------
# {"format", "pack_format", "seq_len", "stage_profile", "tokens": {special token ids},
#  "totals": {...}, "shards": [{"path", "packs", "samples", "tokens", "images", "bytes", "sha256",
#  "row_groups": [packs per row group] (parquet only)}]}
INDEX_SHARDS = "shards"
