from kefu.shared.text import content_tokens, facts, has_cjk, split_sentences, tokenize


def test_chinese_names_match_their_parts_and_whole():
    toks = tokenize("上海交通大学的地址")
    assert {"上海交通大学", "上海", "交通", "大学"} <= set(toks)


def test_model_numbers_stay_whole_and_also_split():
    toks = tokenize("Is the SM-G9910 like the X100?")
    assert {"sm-g9910", "sm", "g9910", "x100"} <= set(toks)


def test_fullwidth_is_normalized():
    assert "x100" in tokenize("Ｘ１００")


def test_sentences_split_on_cjk_and_latin_punctuation_but_not_decimals():
    text = "The kettle holds 1.7 litres. It costs 199 yuan! 保修 18 个月。支持七天无理由退货？"
    assert split_sentences(text) == ["The kettle holds 1.7 litres.", "It costs 199 yuan!", "保修 18 个月。",
                                     "支持七天无理由退货？"]


def test_facts_are_numbers_and_codes():
    assert facts("L2 costs 1,299 yuan; 保修18个月, SM-G9910, 1.7 升") == {"L2", "1299", "18", "SM-G9910", "1.7"}
    assert facts("no numbers here") == set()


def test_stop_words_carry_no_meaning():
    assert content_tokens("How much is the lamp?") == {"lamp"}
    assert has_cjk("电水壶") and not has_cjk("kettle")


def test_a_numbered_step_stays_one_sentence():
    from kefu.shared.text import split_sentences

    assert split_sentences("1. 保持通电。\n2. 按住 RESET 孔约 5 秒。") == ["1. 保持通电。", "2. 按住 RESET 孔约 5 秒。"]
    assert split_sentences("1. Hold the button. It blinks.\n2. Release it.") == \
        ["1. Hold the button.", "It blinks.", "2. Release it."]
    assert split_sentences("The K5 holds 1.7 litres. Version 2. Done.") == ["The K5 holds 1.7 litres.", "Version 2.", "Done."]


def test_stems_meet_plural_and_third_person_forms():
    from kefu.shared.text import stem

    assert [stem(w) for w in ("needs", "batteries", "boxes", "days", "charges")] == \
        ["need", "battery", "box", "day", "charge"]
    assert [stem(w) for w in ("glass", "status", "this", "x100", "gas", "电池")] == \
        ["glass", "status", "this", "x100", "gas", "电池"]
