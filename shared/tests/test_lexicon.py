from kefu.shared.lexicon import PRODUCT_ATTRIBUTES, concepts, expansions


def test_concepts_in_both_languages():
    assert concepts("X100 Pro 的电池多大？") == {"battery"}
    assert concepts("How much is the X100?") == {"price"}
    assert concepts("K5 保修多久") == {"warranty"} <= PRODUCT_ATTRIBUTES
    assert concepts("你们深圳门店几点关门") == {"hours", "location"}
    assert concepts("hello there") == set()
    assert "close" not in concepts("closet") and concepts("the store closes at 9") == {"hours", "location"}


def test_expansions_bridge_languages_without_repeating_the_question():
    words = expansions("X100 Pro 的电池多大？")
    assert "battery" in words and "mah" in words and "电池" not in words
    assert "售价" in expansions("How much is the X100?")
    assert expansions("hello") == []
