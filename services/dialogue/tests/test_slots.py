import datetime as dt

import pytest

from kefu.dialogue.slots import MAX_PREVIOUS_CHARS, extract, needs_product, rewrite

NOW = dt.datetime(2026, 3, 15, 10, 0)


@pytest.mark.parametrize(("text", "slots"), [
    ("我上个月买了X100", {"product": "X100", "date": "2026-02-01"}),
    ("不对，我说的是 X100 Pro", {"product": "X100 Pro"}),
    ("My RV-300 shows E05", {"product": "RV-300"}),
    ("RV-300 出现 E05 怎么办", {"product": "RV-300"}),
    ("订单号 KF20260301123456 还没发货", {"order_id": "KF20260301123456"}),
    ("OrderKF20260301123456notdelivered", {"order_id": "KF20260301123456"}),  # OCR without spaces
    ("call me on +86 13812345678", {"phone": "13812345678"}),
    ("我在2026年3月2日下的单", {"date": "2026-03-02"}),
    ("昨天买的 K5", {"product": "K5", "date": "2026-03-14"}),
    ("你们几点关门", {}),
])
def test_extract(text, slots):
    assert extract(text, NOW) == slots


def test_follow_ups_use_the_remembered_product():
    slots = {"product": "X100"}
    assert rewrite("它保修多久？", slots) == "X100 它保修多久？"
    assert rewrite("what about its battery?", slots) == "X100 what about its battery?"
    assert rewrite("and the price?", slots) == "X100 and the price?"
    assert rewrite("价格呢", slots) == "X100 价格呢"


def test_other_questions_are_left_alone():
    slots = {"product": "X100"}
    assert rewrite("K7 多少钱", slots) == "K7 多少钱"  # names its own product
    assert rewrite("你们深圳门店几点关门？", slots) == "你们深圳门店几点关门？"  # about the shop
    assert rewrite("How do I get an invoice for my order?", slots) == "How do I get an invoice for my order?"
    assert rewrite("它保修多久？", {}) == "它保修多久？"
    assert not needs_product("Can I pay with Alipay?")


def test_elliptical_follow_ups_lean_on_the_previous_question():
    previous = "北京门店周末几点开门？"
    assert rewrite("那工作日呢？", {}, previous) == "北京门店周末几点开门？ 那工作日呢？"
    assert rewrite("and on weekdays?", {}, "When does the Beijing store open on weekends?").startswith("When does")
    assert rewrite("那它积分是几倍？", {}, "金卡会员一年要花多少钱？") == "金卡会员一年要花多少钱？ 那它积分是几倍？"
    assert rewrite("你们深圳门店几点关门？", {}, previous) == "你们深圳门店几点关门？"  # a question of its own


def test_a_new_topic_is_searched_as_it_is_and_discourse_words_are_not_searched():
    slots = {"product": "X100"}
    assert rewrite("另外问一下，你们深圳门店晚上几点关门？", slots, "X100 多少钱") == "你们深圳门店晚上几点关门？"
    assert rewrite("换个问题，那工作日呢？", slots, "北京门店周末几点开门？") == "那工作日呢？"
    assert rewrite("Different question: how long does a refund take?", slots) == "how long does a refund take?"
    assert rewrite("Sorry, I meant the K7 - how many litres is that one?", slots) == \
        "I meant the K7 - how many litres is that one?"
    assert rewrite("对了，它保修多久？", slots) == "X100 它保修多久？"  # still points back at the product
    assert rewrite("No USB port?", {}) == "No USB port?"


def test_a_follow_up_of_a_follow_up_does_not_grow_without_bound():
    previous = ("I paid for an order with my card yesterday evening and it has still not shipped. Can I still "
                "cancel it? Could I change the address instead?")
    query = rewrite("And what if it has already gone out?", {}, previous)
    assert query == "Can I still cancel it? Could I change the address instead? And what if it has already gone out?"
    for _ in range(20):
        query = rewrite("And then?", {}, query)
    assert len(query) <= MAX_PREVIOUS_CHARS + len(" And then?")


def test_model_slot_proposals_are_kept_only_where_the_text_bears_them_out():
    from kefu.dialogue.slots import verify_model_slots

    now = dt.datetime(2026, 11, 25, tzinfo=dt.UTC)
    # What the bundled 135M model proposes for these messages (JSON-schema constrained, greedy).
    text = "My Aurora blender from order 20261124001 has not arrived yet."
    found = extract(text, now)
    proposed = {"product": "Aurora Blender", "order_id": "20261124001", "phone": "1234567890"}
    # The rules found the order number; the product they missed is in the text; the phone number is invented.
    assert found == {"order_id": "20261124001"}
    assert verify_model_slots(proposed, text, found, now) == {"product": "Aurora Blender"}
    # An order number the rules leave alone (no "order" before it) is kept when the text has it.
    bare = "My Aurora blender (20261124001) has not arrived yet."
    assert verify_model_slots(proposed, bare, extract(bare, now), now) == {"product": "Aurora Blender",
                                                                          "order_id": "20261124001"}
    text = "我买的小米空气净化器还没到，手机号 13812345678"
    proposed = {"product": "小米空气净化器", "order_id": "13812345678", "phone": "13812345678",
                "date": "2022-01-01T12:00:00Z"}
    assert verify_model_slots(proposed, text, extract(text, now), now) == {"product": "小米空气净化器"}
    text = "The kettle I bought on Nov 20 leaks."
    proposed = {"product": "Kettle", "order_id": "2026-11-20", "phone": "12345", "date": "2026-11-20", "x": "y"}
    assert verify_model_slots(proposed, text, extract(text, now), now) == {"product": "Kettle", "date": "2026-11-20"}
    assert "date" not in verify_model_slots({"date": "2026-11-20"}, "The kettle leaks.", {}, now)  # invented


def test_a_product_ruled_out_is_not_the_subject():
    now = dt.datetime(2026, 11, 25, tzinfo=dt.UTC)
    assert extract("Wait, sorry, I meant the X100 Pro, not the X200. Per month?", now)["product"] == "X100 Pro"
    assert extract("我说的是 X100 Pro，不是 X200", now)["product"] == "X100 Pro"
    assert extract("Is the X200 better than the X100?", now)["product"] == "X100"  # no negation: the last


def test_measure_words_point_back_at_the_product():
    assert rewrite("这盏灯插在电脑上老是闪，怎么回事？", {"product": "L2"}) == "L2 这盏灯插在电脑上老是闪，怎么回事？"
    assert rewrite("那台还有货吗", {"product": "RV-500"}) == "RV-500 那台还有货吗"


def test_a_member_tier_is_remembered_for_the_questions_about_membership():
    now = dt.datetime(2026, 11, 25, tzinfo=dt.UTC)
    assert extract("金卡会员一年要花多少钱才能达到？", now)["tier"] == "gold"
    assert extract("哦我看错了，我现在其实是银卡", now)["tier"] == "silver"
    assert extract("铂金卡有什么权益", now)["tier"] == "platinum"  # not also gold
    assert rewrite("生日券有多少？", {"tier": "gold"}) == "金卡 gold 生日券有多少？"
    assert rewrite("How much is the X100?", {"tier": "gold"}) == "How much is the X100?"  # not about membership
    assert rewrite("银卡的生日券呢", {"tier": "gold"}).startswith("银卡")  # names its own tier


def test_the_city_of_the_store_asked_about_is_remembered_for_its_hours_and_address():
    now = dt.datetime(2026, 11, 25, tzinfo=dt.UTC)
    assert extract("北京中关村店周末营业到几点？", now)["city"] == "beijing"
    assert extract("Is there a store in Chengdu?", now)["city"] == "chengdu"
    assert "city" not in extract("北京和上海都有店吗", now)  # two cities: neither is the one
    slots = {"city": "beijing"}
    assert rewrite("What time do you close on Sunday?", slots) == "北京 beijing What time do you close on Sunday?"
    assert rewrite("你们店地址在哪？", slots) == "北京 beijing 你们店地址在哪？"
    assert rewrite("上海的店几点关门？", slots) == "上海的店几点关门？"  # names its own city
    assert rewrite("How long do refunds take?", slots) == "How long do refunds take?"  # not about a store


def test_shorter_order_numbers_count_when_the_message_says_so_or_is_only_the_number():
    now = dt.datetime(2026, 11, 25, tzinfo=dt.UTC)
    assert extract("查一下订单 20261124001", now)["order_id"] == "20261124001"
    assert extract("Where is my order #A1234567?", now)["order_id"] == "A1234567"
    assert extract("20261124002", now)["order_id"] == "20261124002"
    # Numbers without the word are not orders: a price, a phone, a quantity.
    assert "order_id" not in extract("X100 costs 3299 yuan, call 13812345678", now)
    assert extract("13812345678", now) == {"phone": "13812345678"}


def test_a_question_of_nothing_of_its_own_is_about_what_was_just_asked():
    previous = "How do I add a gift card to my account?"
    assert rewrite("Is there a limit on how many I can add?", {}, previous) == \
        "How do I add a gift card to my account? Is there a limit on how many I can add?"
    assert rewrite("只有一边有声音怎么办？", {"product": "EB-20"}, "EB-20 怎么连第二台手机？") == "EB-20 只有一边有声音怎么办？"
    assert rewrite("好的，谢谢", {"product": "EB-20"}, "EB-20 怎么连第二台手机？") == "好的，谢谢"  # not a question
    # "What about ...?" leans on the whole previous question, not only its product.
    assert rewrite("What about the case?", {"product": "EB-20"}, "EB-20 If I lose one, what does it cost?") == \
        "EB-20 If I lose one, what does it cost? What about the case?"


def test_small_talk_does_not_lean_on_the_previous_topic():
    from kefu.dialogue.slots import leans_on

    previous = "How much is the X100?"
    for text in ("Are you a robot?", "你是机器人吗？", "Who are you?", "你好，在吗？", "Thanks, anything else?"):
        assert not leans_on(text), text
        assert rewrite(text, {}, previous) == text
    assert leans_on("Is there a limit on how many I can add?")
