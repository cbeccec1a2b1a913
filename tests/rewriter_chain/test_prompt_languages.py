"""Prompts beyond Chinese and English: Japanese and Korean captions are rewritten by a prompt in their
own language, other languages by the English prompt that asks for the caption's language; the
faithfulness rule on Kana and Hangul text; the offline template's question per language. Captions
here are written for this test (not from the repo's samples)."""

from __future__ import annotations

import pytest

from rewriter import prompts
from rewriter.cache import cache_key
from rewriter.offline import template_rewrite


@pytest.mark.parametrize(
    "caption, lang, user",
    [
        ("桜の木の下でお弁当を食べる家族", "ja", "元のキャプション：桜の木の下でお弁当を食べる家族"),
        ("東京タワーの夜景", "ja", "元のキャプション：東京タワーの夜景"),  # Kanji + Katakana: Japanese
        ("ソニーのカメラ", "ja", "元のキャプション：ソニーのカメラ"),
        ("해변에서 뛰어노는 강아지 두 마리", "ko", "원본 캡션: 해변에서 뛰어노는 강아지 두 마리"),
        ("서울 南山 타워의 야경", "ko", "원본 캡션: 서울 南山 타워의 야경"),  # Hangul with Hanja
        ("一只白色的小狗睡在沙发上", "zh", "原始说明：一只白色的小狗睡在沙发上"),
        ("一間臥室的桌子上放著三個花瓶", "zh", "原始说明：一間臥室的桌子上放著三個花瓶"),  # Traditional
        ("我爱NBA篮球", "zh", "原始说明：我爱NBA篮球"),
        ("un perro corriendo en la playa", "en", "Raw caption: un perro corriendo en la playa"),
        ("Новый год в Москве", "en", "Raw caption: Новый год в Москве"),
        # mostly Latin text with a Chinese place name: the English prompt (it asks for the caption's language)
        ("sunset over the West Lake 西湖 in Hangzhou", "en", "Raw caption: sunset over the West Lake 西湖 in Hangzhou"),
    ],
)
def test_prompt_in_the_captions_language(caption, lang, user):
    assert prompts.prompt_language(caption) == lang
    system, user_msg = prompts.build_messages(caption)
    assert system == {"role": "system", "content": prompts.PROMPTS[lang][0]}
    assert user_msg == {"role": "user", "content": user}


def test_each_prompt_is_written_in_its_language_and_asks_for_it():
    assert set(prompts.PROMPTS) == {"en", "zh", "ja", "ko"}
    assert "日本語" in prompts.SYSTEM_PROMPT_JA and "한국어" in prompts.SYSTEM_PROMPT_KO
    assert "中文" in prompts.SYSTEM_PROMPT_ZH
    assert "in the language of the raw caption" in prompts.SYSTEM_PROMPT
    # every prompt names the same JSON contract
    for system, _ in prompts.PROMPTS.values():
        assert system.endswith('{"qa": [{"question": "...", "answer": "..."}], "caption": "..."}')
    # an explicit language wins; an unknown code falls back to the caption's script
    assert prompts.build_messages("a dog", lang="ko")[0]["content"] == prompts.SYSTEM_PROMPT_KO
    assert prompts.build_messages("해변의 강아지", lang="es")[0]["content"] == prompts.SYSTEM_PROMPT_KO


def test_prompt_version_bumped_so_cached_answers_are_not_reused():
    # the v2 prompts never asked Japanese or Korean captions in their language: a v2 cache entry must miss
    assert prompts.PROMPT_VERSION == "qa-v3"
    assert cache_key("m", prompts.PROMPT_VERSION, "桜の木") != cache_key("m", "qa-v2", "桜の木")


@pytest.mark.parametrize(
    "raw, adopted, ok, missing",
    [
        # Japanese: Latin tokens and digits inside Kana/Kanji text are kept; Han numerals count
        ("東京のSONYストアで3人が買い物をしている", "東京のSONYストアで三人が買い物をしている。", True, ""),
        ("東京のSONYストアで3人が買い物をしている", "ソニーの店で三人が買い物をしている。", False, "SONY"),
        ("東京のSONYストアで3人が買い物をしている", "東京のSONYストアで買い物をする人々。", False, "3"),
        ("「千と千尋の神隠し」のポスター", "「千と千尋の神隠し」の映画ポスター。", True, ""),
        ("「千と千尋の神隠し」のポスター", "アニメ映画のポスター。", False, "千と千尋の神隠し"),
        # Katakana loanwords are not names: a paraphrase may drop them
        ("テーブルの上のカメラとレンズ", "机の上に写真機がある。", True, ""),
        # Korean: digits may come back as native number words (whole words), Latin tokens are kept
        ("해변에서 뛰어노는 강아지 2마리", "해변에서 강아지 두 마리가 뛰어논다.", True, ""),
        ("해변에서 뛰어노는 강아지 2마리", "해변에서 강아지 2마리가 뛰어논다.", True, ""),
        ("해변에서 뛰어노는 강아지 2마리", "해변에서 강아지들이 뛰어논다.", False, "2"),
        # "두부" (tofu) starts with 두 but is not the number word
        ("접시 위의 두부 2조각", "접시 위에 두부가 있다.", False, "2"),
        ("삼성 Galaxy 스마트폰과 3개의 케이스", "Galaxy 스마트폰과 세 개의 케이스.", True, ""),
        ("삼성 Galaxy 스마트폰과 3개의 케이스", "스마트폰과 세 개의 케이스.", False, "Galaxy"),
        ("《기생충》 영화 포스터", "영화 《기생충》의 포스터.", True, ""),
        ("《기생충》 영화 포스터", "한국 영화 포스터.", False, "기생충"),
        # a capitalised Latin word after CJK text is not a sentence start, and CJK has no Title Case
        # (both let "Galaxy"/"Apple" go unchecked before)
        ("我用Apple手机拍了一张照片", "我用Apple手机拍了一张照片。", True, ""),
        ("我用Apple手机拍了一张照片", "我用手机拍了一张照片。", False, "Apple"),
        # at the very start a capital may be the sentence's, as in English ("Nike shoes on a floor")
        ("Nike运动鞋摆在木地板上", "木地板上的运动鞋。", True, ""),
        # Hangul words have no case: nothing to check in plain Korean
        ("공원 벤치에 앉아 있는 노인", "노인이 공원 벤치에 앉아 있다.", True, ""),
    ],
)
def test_faithfulness_on_kana_and_hangul(raw, adopted, ok, missing):
    got_ok, detail = prompts.check_faithful(raw, adopted)
    assert (got_ok, detail) == (ok, "" if ok else f"missing from the adopted caption: {missing}")


def test_kana_and_hangul_captions_are_not_garbage():
    assert prompts.faithfulness_constraints("桜の木").garbage is False
    assert prompts.faithfulness_constraints("해변의 강아지").garbage is False
    assert prompts.faithfulness_constraints("の").garbage is True


@pytest.mark.parametrize(
    "caption, question, answer",
    [
        ("桜の木の下でお弁当を食べる家族", "画像には何が写っていますか？", "桜の木の下でお弁当を食べる家族。"),
        ("해변에서 뛰어노는 강아지 두 마리", "이미지에 무엇이 있나요?", "해변에서 뛰어노는 강아지 두 마리."),
        ("一只白色的小狗睡在沙发上", "图片里有什么？", "一只白色的小狗睡在沙发上。"),
        ("a white puppy asleep on a sofa", "What does the image show?", "A white puppy asleep on a sofa."),
    ],
)
def test_offline_template_question_per_language(caption, question, answer):
    out = template_rewrite(caption)
    assert out == {"qa": [{"question": question, "answer": answer}], "caption": answer}
    ok, reason, _ = prompts.validate(caption, prompts.render_output(out["qa"], out["caption"]), "stop")
    assert (ok, reason) == (True, "ok")


def test_render_output_puts_question_before_answer():
    # seed files are written with sorted keys ("answer" first); SFT targets follow the schema's order
    text = prompts.render_output([{"answer": "A dog.", "question": "What?"}], "A dog.")
    assert text == '{"qa": [{"question": "What?", "answer": "A dog."}], "caption": "A dog."}'


# Captions written for this test (not the repo's samples): the language a person reads in each.
OWN_CAPTIONS = [
    ("两只小猫趴在窗台上晒太阳", "zh"), ("夜晚的上海外滩灯火通明", "zh"), ("北京地铁10号线的车厢里人很多", "zh"),
    ("一盘饺子", "zh"), ("台北101大樓的夜景", "zh"), ("兩個小朋友在公園裡玩耍", "zh"),
    ("2019年新款女装连衣裙 夏季 韩版 图片来源：视觉中国", "zh"),
    ("富士山と桜", "ja"), ("東京駅の赤レンガ駅舎", "ja"), ("猫がソファの上で寝ている", "ja"), ("雪の中の白川郷", "ja"),
    ("서울 남산타워의 야경", "ko"), ("김치찌개와 밥", "ko"), ("경복궁의 가을 단풍", "ko"), ("지하철 안의 사람들", "ko"),
    ("Golden Gate Bridge in the fog at sunrise", "en"), ("View of Mount Fuji from Lake Kawaguchi", "en"),
    # mixed: a Latin brand or acronym inside CJK text stays CJK; a CJK name inside English stays English
    ("我爱NBA篮球", "zh"), ("在Starbucks喝咖啡的女孩", "zh"), ("iPhone 15 Pro Max 手机壳 透明 防摔", "zh"),
    ("iPhone拍摄的夜景", "zh"), ("Tokyo 東京 タワー", "ja"), ("LG 올레드 TV", "ko"),
    ("sunset over the West Lake 西湖 in Hangzhou", "en"),
]


@pytest.mark.parametrize("caption, want", OWN_CAPTIONS)
def test_prompt_language_on_own_captions_agrees_with_the_filters_language_id(caption, want):
    from transforms import lang

    assert prompts.prompt_language(caption) == want
    # the prompt's script rule and the filter's language ID (CLD2 + script rules) say the same
    assert lang.detect(caption).lang == want
