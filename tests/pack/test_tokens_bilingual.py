"""The bundled tokenizer knows Chinese: common words are single tokens and Chinese captions cost
about what production tokenizers charge (docs/bilingual.md), not one token per UTF-8 byte."""

from transforms import tokens as T

# Written for this test (not in COCO-CN): captions the tokenizer never saw.
UNSEEN_ZH = ["公园里有一只黑色的狗在草地上奔跑", "两个小孩在海边堆沙堡", "一位老人坐在长椅上看报纸"]
UNSEEN_EN = ["a black dog running on the grass in a park", "two children building a sandcastle by the sea"]


def test_common_chinese_words_are_single_tokens():
    tok = T.TextTokenizer()
    for word in ("男人", "一只", "网球场", "桌子上"):
        assert len(tok.encode(word)) == 1, word


def test_chinese_costs_less_than_a_token_per_character_and_round_trips():
    tok = T.TextTokenizer()
    zh_tokens = sum(len(tok.encode(c)) for c in UNSEEN_ZH)
    zh_chars = sum(len(c) for c in UNSEEN_ZH)
    # The old English-only tokenizer spent 3 tokens per Han character (one per UTF-8 byte);
    # Llama-3's published figure on Chinese web text is ~0.8 tokens per character.
    assert zh_tokens <= zh_chars
    en_tokens = sum(len(tok.encode(c)) for c in UNSEEN_EN)
    assert en_tokens <= 0.3 * sum(len(c) for c in UNSEEN_EN)
    for c in UNSEEN_ZH + UNSEEN_EN:
        assert tok.decode(tok.encode(c)) == c


def test_training_reads_the_chinese_sample():
    caps = T.read_sample_captions(T.REPO / "data" / "sample")
    assert "一个男人和一个女人穿着军装玩手机。" in caps
    # 2,000 COCO-CN captions; one of them starts with a digit ("3艘小船在海边，…")
    assert sum(1 for c in caps if "\u4e00" <= c[:1] <= "\u9fff") == 1999
    assert "3艘小船在海边，每艘船上有许多人" in caps
