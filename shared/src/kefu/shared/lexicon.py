"""A small bilingual lexicon of what customers ask about (price, warranty, battery, shipping, ...).

Customers and documents rarely use the same words ("多少钱" / "售价", "how much" / "Price:", "电池" /
"battery"). Expanding a question with the other words of the concepts it mentions lets keyword search
and evidence selection meet the document halfway, across Chinese and English, without a model.
"""

from __future__ import annotations

import functools
import re

from kefu.shared.text import has_cjk, normalize

# concept -> words in Chinese and English. Words are matched after tokenization (jieba, lower case).
CONCEPTS: dict[str, tuple[str, ...]] = {
    "price": ("价格", "售价", "价钱", "原价", "现价", "清仓价", "特价", "到手价", "多少钱", "几块钱", "费用", "收费", "price", "cost", "costs", "priced", "how much is", "how much are", "how much does", "how much would",
              "how much for",
              "yuan", "fee"),
    "warranty": ("保修", "质保", "保固", "维修", "warranty", "guarantee", "repair"),
    "battery": ("电池", "续航", "电量", "毫安", "battery", "mah", "runtime"),
    "charging": ("充电", "快充", "充电器", "charging", "charger", "charge"),
    "shipping": ("发货", "配送", "快递", "运费", "送达", "包邮", "物流", "包裹", "shipping", "ship", "ships", "delivery",
                 "deliver", "courier", "dispatch", "dispatched", "shipped", "gone out", "sent out", "发出", "parcel"),
    "tracking": ("查物流", "物流信息", "物流轨迹", "快递到哪", "到哪了", "运单号", "tracking", "track my", "tracking number",
                 "where is my order", "where's my order", "where is my parcel"),
    "lost": ("丢件", "丢了", "丢失", "遗失", "lost", "missing", "never arrived"),
    "damaged": ("压坏", "破损", "损坏", "摔坏", "压扁", "damaged", "damage", "crushed", "dented"),
    "pickup": ("自提", "到店取", "门店取货", "pick up", "pickup", "collect in store", "click and collect"),
    "returns": ("退货", "退款", "退换", "无理由", "return", "returns", "refund", "refunds"),
    # A new unit instead of the faulty one (换货), not money back.
    "exchange": ("换货", "换新", "换一台", "换个新的", "exchange", "replacement", "replace it", "new one", "new unit",
                 "swap it"),
    "fault": ("故障", "坏了", "不工作", "不加热", "不制热", "不能用", "用不了", "没反应", "失灵", "fault", "faults",
              "faulty", "defective", "broken", "stopped working", "stopped heating", "not working", "doesn't work",
              "does not work", "won't turn on", "won't charge"),
    # The order has left the warehouse: what is possible then differs from before dispatch.
    "shipped": ("已发货", "已经发货", "发出了", "已发出", "已经发出", "寄出了", "已寄出", "already shipped", "has shipped",
                "have shipped", "been shipped", "gone out", "already sent", "after dispatch", "already dispatched",
                "been dispatched", "on its way", "in transit"),
    "hours": ("营业", "营业时间", "几点", "开门", "关门", "打烊", "hours", "open", "opens", "close", "closes",
              "opening", "closing"),
    "weekday": ("工作日", "周一至周五", "周一到周五", "平日", "weekday", "weekdays", "monday to friday", "workday",
                "working day", "working days"),
    "weekend": ("周末", "周六", "周日", "星期六", "星期日", "星期天", "双休日", "weekend", "saturday", "sunday",
                "saturday and sunday"),
    "screen": ("屏幕", "尺寸", "英寸", "显示屏", "screen", "display", "inch"),
    "weight": ("重量", "多重", "weight", "weigh", "weighs", "grams"),
    "capacity": ("容量", "几升", "多少水", "装多少", "capacity", "litre", "litres", "liter", "liters", "hold",
                 "holds"),
    "payment": ("支付", "付款", "支付宝", "微信支付", "云闪付", "pay", "payment", "alipay", "wechat", "paid", "paying"),
    "installment": ("分期", "月供", "花呗分期", "installment", "installments", "split the payment", "split it", "monthly",
                    "per month", "a month"),
    "cod": ("货到付款", "cash on delivery", "pay on delivery", "cod"),
    "giftcard": ("礼品卡", "购物卡", "储值卡", "gift card", "gift-card", "giftcard"),
    "balance": ("余额", "balance"),
    "bind": ("绑定", "绑卡", "add to my account", "add it to my account", "add a gift card", "link to my account",
             "redeem"),
    "coupon": ("优惠券", "券", "满减", "coupon", "voucher"),
    "price_protection": ("价格保护", "价保", "差价", "降价", "price protection", "price drop", "price dropped",
                         "cheaper", "the difference", "price difference"),
    "trade_in": ("以旧换新", "换购", "旧机", "旧手机", "回收", "补贴", "trade-in", "trade in", "trading in", "old phone",
                 "old device", "bonus"),
    "student": ("学生", "学生证", "student", "uni student", "university student"),
    "invoice": ("发票", "开票", "invoice", "receipt", "fapiao"),
    "location": ("地址", "在哪", "在哪里", "位置", "门店", "address", "where", "location", "store"),
    "membership": ("会员", "积分", "member", "membership", "points"),
    "account": ("账号", "账户", "帐号", "帐户", "account"),
    "password": ("密码", "password", "passcode"),
    "forgot": ("re:忘(?:记|了)?[^，。？?]{0,4}密码|密码忘", "forgot password", "forgot my password", "forgotten password",
               "reset my password", "reset the password", "new password"),
    "order_number": ("订单号", "单号", "订单编号", "order number", "order no", "reference number", "tracking number"),
    "verification": ("验证码", "短信验证码", "verification code", "sms code", "6-digit code"),
    "locked": ("锁定", "被锁", "冻结", "locked", "locked out"),
    "deletion": ("注销", "删除账号", "delete my account", "delete account", "deleting your account", "close my account"),
    "reset": ("重置", "恢复出厂", "复位", "reset", "factory reset"),
    "installation": ("安装", "上门安装", "装机", "install", "installation", "installed"),
    # Membership tiers: "金卡" is the "Gold" line of an English table.
    "tier_regular": ("普通会员", "regular member", "regular tier", "regular:"),
    "tier_silver": ("银卡", "白银", "silver"),
    "tier_gold": ("re:(?<!铂)金卡", "黄金会员", "gold"),
    "tier_platinum": ("铂金", "白金", "platinum"),
    "camera": ("相机", "摄像头", "像素", "camera", "megapixel", "mp"),
    "wireless": ("无线", "wireless", "qi"),
    "waterproof": ("防水", "游泳", "waterproof", "water resistance", "water-resistant", "ip68", "ip67", "ip54",
                   "swimming", "swim"),
    "temperature": ("温度", "保温", "temperature", "°c", "degrees", "keep warm"),
    "deposit": ("定金", "订金", "预订", "预售", "尾款", "补款", "deposit", "pre-order", "preorder", "left to pay",
                "remaining payment", "final payment", "rest of the payment", "pay the rest"),
    "noise": ("降噪", "噪音", "分贝", "静音", "noise", "noise cancellation", "noise cancelling", "anc", "decibel", "db"),
    "suction": ("吸力", "suction"),
    "height": ("高度", "多高", "机身高度", "厚度", "how tall", "height", "tall"),
    "dock": ("集尘", "集尘座", "基站", "dock", "base station", "self-emptying", "auto-empty"),
    "pairing": ("配对", "蓝牙", "回连", "pair", "pairing", "bluetooth"),
    "coverage": ("覆盖", "平方米", "面积", "多大的房", "适合多大", "coverage", "cover", "square metres", "square meters",
                 "m²", "㎡", "room size", "how big a room", "rooms up to"),
    "filter": ("滤芯", "滤网", "filter", "filters", "cartridge"),
    "expiry": ("过期", "有效期", "清零", "expire", "expires", "expiry", "valid"),
    "birthday": ("生日", "birthday"),
    "hotline": ("热线", "客服电话", "电话", "hotline", "phone number", "call"),
    "service": ("客服", "客户服务", "customer service", "customer support", "support team", "service team"),
    "aftersales": ("售后", "售后服务", "after-sales", "after sales", "aftersales"),
    "cancel": ("取消", "撤销", "cancel", "cancellation", "call off"),
    "address": ("改地址", "修改地址", "收货地址", "delivery address", "change the address"),
    "light": ("色温", "亮度", "调光", "colour temperature", "color temperature", "brightness", "kelvin"),
    "flicker": ("频闪", "闪烁", "忽明忽暗", "闪", "flicker", "flickers", "flickering"),
    "computer": ("电脑", "笔记本", "台式机", "computer", "laptop", "pc"),
    "obstacle": ("越障", "门槛", "threshold", "obstacle", "climb"),
    "runtime": ("续航", "扫多久", "能用多久", "用多久", "run time", "runtime", "battery life", "on one charge",
                "full charge", "per charge"),
    "mesh": ("组网", "mesh", "nodes"),
    # Cities (a store's, a delivery's): "深圳" is the "Shenzhen" of an English page.
    "city_beijing": ("北京", "beijing"),
    "city_shanghai": ("上海", "shanghai"),
    "city_shenzhen": ("深圳", "shenzhen"),
    "city_guangzhou": ("广州", "guangzhou"),
    "city_chengdu": ("成都", "chengdu"),
    "city_hangzhou": ("杭州", "hangzhou"),
    "city_chongqing": ("重庆", "chongqing"),
    "city_wuhan": ("武汉", "wuhan"),
    "city_nanjing": ("南京", "nanjing"),
    "city_tianjin": ("天津", "tianjin"),
    "city_xian": ("西安", "xi'an", "xian"),
    "city_suzhou": ("苏州", "suzhou"),
    "city_hongkong": ("香港", "hong kong"),
    "city_macau": ("澳门", "macau", "macao"),
}

# Concepts that describe a product (a question about one of them, without a product, is about the last
# product mentioned); the others (hours, location, payment...) are about the shop.
# Concepts that name one of a set of alternatives the visitor has (their member tier): remembered as a
# slot and carried into the questions about the group's topics ("生日券有多少？" after "我是金卡").
ENTITY_GROUPS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "tier": (("tier_regular", "tier_silver", "tier_gold", "tier_platinum"),
             frozenset({"membership", "birthday", "shipping", "returns"})),
    # The city of the store asked about: "那周末几点关门？" after "北京的店" is about Beijing.
    "city": (tuple(name for name in CONCEPTS if name.startswith("city_")),
             frozenset({"hours", "location", "weekday", "weekend"})),
}


# Every alternative of every group: who or where a question is about, not what it asks.
ENTITY_NAMES = frozenset(name for names, _ in ENTITY_GROUPS.values() for name in names)


def entity(text: str, group: str) -> str:
    """The one alternative of ``group`` that ``text`` names ("tier_gold"), or "" (none, or several)."""
    names = concepts(text) & set(ENTITY_GROUPS[group][0])
    return next(iter(names)) if len(names) == 1 else ""


def entities(text: str, group: str) -> frozenset[str]:
    """Every alternative of ``group`` that ``text`` names ({"city_beijing", "city_shanghai"})."""
    return concepts(text) & frozenset(ENTITY_GROUPS[group][0])


def entity_words(name: str) -> str:
    """The words of an entity concept in both languages, for a query ("金卡 gold")."""
    words = [w for w in CONCEPTS[name] if not w.startswith("re:")]
    chinese = next((w for w in words if has_cjk(w)), "")
    english = next((w for w in words if not has_cjk(w)), "")
    if name == "tier_gold":
        chinese = "金卡"  # its Chinese pattern is a regular expression (not 铂金卡)
    return " ".join(w for w in (chinese, english) if w)


PRODUCT_ATTRIBUTES = frozenset({"price", "warranty", "battery", "charging", "screen", "weight", "capacity", "camera",
                                "wireless", "waterproof", "temperature", "coverage", "filter", "light", "obstacle",
                                "runtime", "mesh", "noise", "suction", "height", "dock", "pairing", "flicker",
                                "installation", "reset"})


def _pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    # Chinese words and English phrases match anywhere (Chinese has no spaces to split at); other
    # words only whole ("close" is not in "closet").
    # A word written "re:..." is a regular expression ("re:(?<!铂)金卡": 金卡 but not 铂金卡).
    inside = [w[3:] if w.startswith("re:") else re.escape(w) for w in words
              if w.startswith("re:") or has_cjk(w) or " " in w or not w.isalnum()]
    whole = [re.escape(w) for w in words if not (w.startswith("re:") or has_cjk(w) or " " in w or not w.isalnum())]
    # (with a plural ending: "temperatures" asks about temperature).
    parts = inside + ([rf"(?<![a-z0-9])(?:{'|'.join(whole)})(?:s|es)?(?![a-z0-9])"] if whole else [])
    return re.compile("|".join(parts))


_PATTERNS = {name: _pattern(words) for name, words in CONCEPTS.items()}


@functools.lru_cache(maxsize=8192)
def concepts(text: str) -> frozenset[str]:
    """The concepts ``text`` mentions (cached: the same knowledge-base sentences come back often)."""
    norm = normalize(text)
    return frozenset(name for name, pattern in _PATTERNS.items() if pattern.search(norm))


def expansions(text: str) -> list[str]:
    """The other words of every concept ``text`` mentions, in both languages (not those it has)."""
    norm = normalize(text)
    out: list[str] = []
    for name in sorted(concepts(text)):
        out.extend(w for w in CONCEPTS[name] if not w.startswith("re:") and not _pattern((w,)).search(norm))
    return out
