"""The fixed vocabulary of ledger reasons, one constant per reason, grouped by stage.

Counters and ledger rows only ever use these names; ``check_reason`` guards against typos.
"""

from __future__ import annotations

OK = "ok"

# --- ingest (read before any filter ran) -----------------------------------------------------
DOWNLOAD_FAILED = "download_failed"  # img2dataset status != success (its error_message in detail)
MISSING_FROM_TAR = "missing_from_tar"  # status file says success, but the tar has no such sample
TAR_TRUNCATED = "tar_truncated"  # tar ends inside a member; the member (and the rest) are lost
TAR_UNREADABLE = "tar_unreadable"  # not a tar at all / header checksum errors
UNSAFE_MEMBER_NAME = "unsafe_member_name"  # absolute path, '..', or a key with dots/slashes
UNSAFE_MEMBER_TYPE = "unsafe_member_type"  # symlink, hardlink, device or fifo member: never followed or read
MEMBER_NAME_INVALID_UTF8 = "member_name_invalid_utf8"  # tar member name that is not UTF-8
MEMBER_TOO_LARGE = "member_too_large"  # tar member bigger than ingest's max_member_bytes: skipped unread
FIELD_INVALID_UTF8 = "field_invalid_utf8"  # a csv/tsv field other than the caption (url, key, meta) is not UTF-8
CAPTION_NOT_TEXT = "caption_not_text"  # caption cell is a number, list, struct, ... (never str()-ed)
DUPLICATE_KEY = "duplicate_key"  # a second record with a key already seen in this stage
ROW_UNREADABLE = "row_unreadable"  # malformed csv/jsonl row
CAPTION_MISSING = "caption_missing"  # no caption at all (null / no .txt member)
CAPTION_INVALID_UTF8 = "caption_invalid_utf8"
URL_MISSING = "url_missing"

# --- caption filters -------------------------------------------------------------------------
CAPTION_EMPTY = "caption_empty"
CAPTION_TOO_SHORT_CHARS = "caption_too_short_chars"
CAPTION_TOO_SHORT_WORDS = "caption_too_short_words"
CAPTION_TOO_LONG_CHARS = "caption_too_long_chars"
CAPTION_TOO_LONG_WORDS = "caption_too_long_words"
CAPTION_CONTROL_CHARS = "caption_control_chars"
CAPTION_NON_ALPHA = "caption_non_alpha"
CAPTION_REPETITIVE = "caption_repetitive"
CAPTION_BOILERPLATE = "caption_boilerplate"
CAPTION_LANGUAGE = "caption_language"

# --- image filters ---------------------------------------------------------------------------
IMAGE_MISSING = "image_missing"  # an image input (tar, img2dataset parquet) record without image bytes
IMAGE_EMPTY = "image_empty"
IMAGE_UNDECODABLE = "image_undecodable"
IMAGE_TRUNCATED = "image_truncated"
IMAGE_FORMAT = "image_format"  # a format mmcorpus does not take (GIF, BMP, HEIC, ...): the detail names it
IMAGE_ANIMATED = "image_animated"  # animated GIF/WebP/APNG (first-frame use would be silent)
IMAGE_TOO_MANY_PIXELS = "image_too_many_pixels"  # decompression-bomb guard, checked from the header
IMAGE_TOO_SMALL = "image_too_small"
IMAGE_ASPECT_RATIO = "image_aspect_ratio"

# --- dedup -----------------------------------------------------------------------------------
EXACT_CAPTION = "exact-caption"
EXACT_IMAGE = "exact-image"
NEAR_CAPTION = "near-caption"
NEAR_IMAGE = "near-image"
CAPTION_OVERUSED = "caption_overused"  # strict dedup: a caption on more than max_pairs_per_caption image records

# --- rewrite ---------------------------------------------------------------------------------
REWRITE_SKIPPED = "rewrite_skipped"  # kept as is: policy did not select it (status kept)
REWRITE_INVALID_JSON = "rewrite_invalid_json"
REWRITE_OFF_FORMAT = "rewrite_off_format"
REWRITE_TRUNCATED = "rewrite_truncated"
REWRITE_EMPTY = "rewrite_empty"
REWRITE_UNFAITHFUL = "rewrite_unfaithful"
REWRITE_EXHAUSTED_RETRIES = "rewrite_exhausted_retries"
REWRITE_CLIENT_ERROR = "rewrite_client_error"  # non-retryable 4xx

# --- pack ------------------------------------------------------------------------------------
PACK_TOO_LONG = "pack_too_long"  # sample longer than the sequence length and splitting is off
PACK_TOO_MANY_IMAGES = "pack_too_many_images"
PACK_NO_IMAGE = "pack_no_image"
PACK_IMAGE_UNDECODABLE = "pack_image_undecodable"

# --- select ----------------------------------------------------------------------------------
NOT_SELECTED = "not_selected"  # eligible, but the per-source / per-language draw left it out
NOT_ELIGIBLE = "not_eligible"  # the stage's eligibility rule excludes it (e.g. shorter side < 448 px)
IN_EARLIER_SELECTION = "in_earlier_selection"  # disjoint re-selection: the named earlier selection holds it

# --- image models (ocr, safety) -------------------------------------------------------------
MODEL_ERROR = "model_error"  # a per-image model raised on a decoded image (the detail names the model)
NSFW = "nsfw"  # NSFW detector score >= the configured reject threshold
LAION_PUNSAFE = "laion_punsafe"  # the source's LAION punsafe metadata >= the configured threshold
LAION_PWATERMARK = "laion_pwatermark"  # the source's LAION pwatermark metadata >= the configured threshold
IMAGE_WATERMARK = "image_watermark"  # OCR text matches a stock-photo credit rule
CAPTION_PII = "caption_pii"  # caption holds PII (e-mail, phone, card, resident ID) and policy is reject

# --- sft (ingest, split, pack) ------------------------------------------------------------------
SFT_RECORD_UNREADABLE = "sft_record_unreadable"  # not a JSON object / lacks the fields its format needs
SFT_NO_TURNS = "sft_no_turns"  # no user/assistant turn at all
SFT_BAD_ROLE = "sft_bad_role"  # a speaker that is neither human/user, gpt/assistant nor system
SFT_CONSECUTIVE_USER = "sft_consecutive_user"  # two user (human) turns in a row
SFT_CONSECUTIVE_ASSISTANT = "sft_consecutive_assistant"  # two assistant turns in a row / assistant first
SFT_ENDS_WITH_USER = "sft_ends_with_user"  # last turn is a question without an answer
SFT_EMPTY_ANSWER = "sft_empty_answer"  # an assistant turn that is empty or whitespace
SFT_EMPTY_QUESTION = "sft_empty_question"
SFT_MARKER_WITHOUT_IMAGE = "sft_marker_without_image"  # <image> in a turn, no image named
SFT_IMAGE_WITHOUT_MARKER = "sft_image_without_marker"  # an image named, no <image> in any user turn
SFT_MULTIPLE_MARKERS = "sft_multiple_markers"  # more than one <image> for the one image
SFT_MARKER_IN_ANSWER = "sft_marker_in_answer"  # <image> inside an assistant turn
SFT_IMAGE_NOT_FOUND = "sft_image_not_found"  # the named image is not in the image source
SFT_TOO_MANY_TURNS = "sft_too_many_turns"  # more turns than max_turns
SFT_TOO_LONG_CHARS = "sft_too_long_chars"  # more characters than max_chars
SFT_OTHER_PART = "sft_other_part"  # sft pack --part N: the record belongs to the other part
SFT_LABEL_MISMATCH = "sft_label_mismatch"  # sft pack --check-mask: labels differ from the template's generation mask
SFT_TOO_LONG = "sft_too_long"  # templated tokens > seq_len and truncation is off (or cannot help)

# --- rlaifv (generate, feedback, pairs) -------------------------------------------------------
# Transport failures of model calls reuse the client's rewrite_exhausted_retries / rewrite_client_error /
# rewrite_invalid_json (one model-call layer); the detail names the endpoint (policy, claims, labeler).
RLAIFV_IMAGE_UNDECODABLE = "rlaifv_image_undecodable"  # no image bytes, or bytes PIL cannot decode
RLAIFV_NO_PROMPT = "rlaifv_no_prompt"  # neither the record's QA nor the prompt pool gives a prompt
RLAIFV_EMPTY_RESPONSE = "rlaifv_empty_response"  # the policy answered with empty / whitespace text
RLAIFV_CLAIMS_INVALID = "rlaifv_claims_invalid"  # claim splitter output is not {"claims": [str, ...]}
RLAIFV_QUESTIONS_INVALID = "rlaifv_questions_invalid"  # not {"questions": [str]} with one question per claim
RLAIFV_ANSWER_NOT_YES_NO = "rlaifv_answer_not_yes_no"  # labeler answer is not exactly yes or no
RLAIFV_TOO_FEW_RESPONSES = "rlaifv_too_few_responses"  # fewer than 2 usable responses survived (detail: why)
RLAIFV_NO_PAIR = "rlaifv_no_pair"  # a response set gave no pair (all gaps < margin, ties, length control)

# --- unexpected exceptions (dead letter): "exception_<ExcType>" ------------------------------
EXCEPTION_PREFIX = "exception_"

ALL = frozenset(v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str) and k != "EXCEPTION_PREFIX")


def exception_reason(exc: BaseException) -> str:
    """Dead-letter reason for an unexpected exception: its type name only, never its text."""
    return EXCEPTION_PREFIX + type(exc).__name__


def check_reason(reason: str) -> str:
    if reason in ALL or reason.startswith(EXCEPTION_PREFIX):
        return reason
    raise ValueError(f"unknown ledger reason {reason!r}; add it to schemas/reasons.py")
