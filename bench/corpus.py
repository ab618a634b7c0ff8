"""A deterministic synthetic knowledge base of any size, in English and Chinese, with identifiers,
for the retrieval benchmarks (the quality benchmark uses the hand-written set in data/retrieval/)."""

from __future__ import annotations

import random

PRODUCTS_EN = ["kettle", "desk lamp", "robot vacuum", "router", "phone", "earbuds", "air purifier", "rice cooker",
               "smart watch", "tablet", "monitor", "keyboard", "blender", "heater", "fan", "camera"]
PRODUCTS_ZH = ["电水壶", "台灯", "扫地机器人", "路由器", "手机", "耳机", "空气净化器", "电饭煲", "智能手表", "平板电脑",
               "显示器", "键盘", "破壁机", "取暖器", "电风扇", "相机"]
FACETS_EN = ["costs {p} yuan", "has a {w} month warranty", "ships within {d} days", "weighs {g} grams",
             "supports {n} W fast charging", "runs for {m} minutes on one charge", "comes in {c} colours"]
FACETS_ZH = ["售价 {p} 元", "保修 {w} 个月", "下单后 {d} 天内发货", "重量 {g} 克", "支持 {n} W 快充", "续航 {m} 分钟",
             "有 {c} 种颜色可选"]
CITIES = ["上海", "北京", "深圳", "成都", "杭州", "南京", "武汉", "西安"]


def model_number(rng: random.Random) -> str:
    letters = "".join(rng.choice("ABCDEFGHKLMNPRSTVXZ") for _ in range(rng.randint(1, 3)))
    sep = rng.choice(["", "-"])
    return f"{letters}{sep}{rng.randint(10, 99999)}"


def document(i: int, rng: random.Random) -> tuple[str, str, str]:
    """(doc_id, title, text) of document ``i``."""
    model = model_number(rng)
    values = dict(p=rng.randint(49, 9999), w=rng.choice([6, 12, 18, 24, 36]), d=rng.randint(1, 7),
                  g=rng.randint(80, 5000), n=rng.choice([18, 33, 65, 100, 120]), m=rng.randint(30, 600),
                  c=rng.randint(2, 6))
    if rng.random() < 0.5:
        product = rng.choice(PRODUCTS_EN)
        facets = rng.sample(FACETS_EN, 3)
        text = f"The {model} {product} " + ", ".join(f.format(**values) for f in facets) + "."
        text += f" It is available in our {rng.choice(['Shanghai', 'Beijing', 'Shenzhen', 'Chengdu'])} stores."
        title = f"{product.title()} {model}"
    else:
        product = rng.choice(PRODUCTS_ZH)
        facets = rng.sample(FACETS_ZH, 3)
        text = f"{model} {product}" + "，".join(f.format(**values) for f in facets) + "。"
        text += f"{rng.choice(CITIES)}门店有现货。"
        title = f"{product} {model}"
    return f"doc{i}", title, text


def corpus(n: int, seed: int = 7) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    return [document(i, rng) for i in range(n)]


def queries(docs: list[tuple[str, str, str]], n: int, seed: int = 11) -> list[str]:
    """Questions about random documents of ``docs`` (their title and a facet word)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        _, title, _ = rng.choice(docs)
        out.append(rng.choice([f"How much is the {title}?", f"{title} 保修多久？", f"{title} warranty",
                               f"{title} 多少钱", f"does the {title} ship fast"]))
    return out
