from kefu.shared.lexicon import PRODUCT_ATTRIBUTES, concepts, expansions


def test_concepts_in_both_languages():
    assert concepts("X100 Pro 的电池多大？") == {"battery"}
    assert concepts("How much is the X100?") == {"price"}
    assert concepts("K5 保修多久") == {"warranty"} <= PRODUCT_ATTRIBUTES
    assert concepts("你们深圳门店几点关门") == {"hours", "location", "city_shenzhen"}
    assert concepts("hello there") == set()
    assert "close" not in concepts("closet") and concepts("the store closes at 9") == {"hours", "location"}


def test_expansions_bridge_languages_without_repeating_the_question():
    words = expansions("X100 Pro 的电池多大？")
    assert "battery" in words and "mah" in words and "电池" not in words
    assert "售价" in expansions("How much is the X100?")
    assert expansions("hello") == []


def test_customer_service_concepts_that_documents_put_in_other_words():
    assert concepts("这盏灯插在电脑上老是闪") == {"flicker", "computer"}
    assert "flicker" not in concepts("色温能调到多少") and "light" in concepts("色温能调到多少")
    assert concepts("And what if it has already gone out?") >= {"shipped"}
    assert "shipped" not in concepts("When will it ship?")
    assert concepts("那工作日呢？") == {"weekday"} and "weekend" in concepts("Saturday and Sunday 10:00-22:00")
    assert {"exchange", "fault"} <= concepts("It stopped heating. Can I get a new one instead of a repair?")
    assert "deposit" in concepts("And how much is left to pay after that?")
    assert "service" in concepts("Contacting Customer Service") and "service" in concepts("客服热线")


def test_cities_meet_across_languages():
    from kefu.shared.lexicon import entities

    assert entities("你们深圳门店几点关门", "city") == {"city_shenzhen"}
    assert entities("Shenzhen Huaqiangbei Store", "city") == {"city_shenzhen"}
    assert "shenzhen" in expansions("深圳门店")
    assert entities("北京和上海", "city") == {"city_beijing", "city_shanghai"}


def test_account_and_order_concepts():
    assert "forgot" in concepts("管理密码忘了") and "forgot" in concepts("I forgot my password")
    assert "forgot" not in concepts("密码要 8-20 位")
    assert "order_number" in concepts("SF 开头的单号是你们的订单号吗？") and "order_number" in concepts("the order number")
    assert concepts("Is cash on delivery possible?") >= {"cod"} and "installment" in concepts("分 12 期，每期月供多少")
