"""Orders and customer records from the company's CRM, over its HTTP API (read-only).

Settings per tenant (``PUT /v1/tenants/{tenant}/plugins/crm_adapter``): ``base_url`` of the CRM API
(its host must be on KEFU_PLUGINS_ALLOWED_HOSTS) and an optional ``api_key`` sent as a Bearer token.
The CRM answers ``GET {base_url}/orders/{order_id}`` and ``GET {base_url}/customers?phone=...``.
"""

from urllib.parse import quote

MANIFEST = {
    "name": "crm_adapter",
    "version": "1.0.0",
    "description": "Looks up orders and customer records in the CRM",
    "settings": {
        "type": "object",
        "required": ["base_url"],
        "properties": {
            "base_url": {"type": "string", "pattern": "^https?://"},
            "api_key": {"type": "string"},
        },
    },
    "tools": [
        {
            "name": "order_status",
            "description": "Status, items and shipping of one order",
            "side_effecting": False,
            "timeout_s": 5,
            "rate_per_minute": 120,
            "arguments": {"type": "object", "required": ["order_id"],
                          "properties": {"order_id": {"type": "string", "pattern": "^[A-Za-z0-9-]{6,32}$"}}},
        },
        {
            "name": "customer_lookup",
            "description": "The customer record for a phone number",
            "side_effecting": False,
            "timeout_s": 5,
            "arguments": {"type": "object", "required": ["phone"],
                          "properties": {"phone": {"type": "string", "pattern": "^\\+?[0-9]{6,15}$"}}},
        },
    ],
    "intents": [
        {
            "tool": "order_status",
            "keywords": ["查订单", "查一下订单", "订单状态", "订单到哪", "物流", "快递到哪", "发货了吗", "到哪了",
                         "order status", "where is my order", "track my order", "tracking", "has my order"],
            "examples": ["查一下订单 20261124001", "我的订单 20261124001 到哪了？", "Where is my order 20261124001?"],
            "slot_arguments": {"order_id": "order_id"},
            "ask_zh": "请告诉我您的订单号，我帮您查询。",
            "ask_en": "Please tell me your order number and I'll look it up.",
        },
    ],
}

_STATUS_ZH = {"pending": "待付款", "paid": "已付款，待发货", "shipped": "已发货", "delivered": "已签收",
              "cancelled": "已取消", "refunding": "退款中", "refunded": "已退款"}


def _headers(ctx):
    key = ctx.settings.get("api_key")
    return {"Authorization": f"Bearer {key}"} if key else {}


async def order_status(ctx, order_id):
    base = ctx.settings["base_url"].rstrip("/")
    resp = await ctx.http.get(f"{base}/orders/{quote(order_id)}", headers=_headers(ctx))
    if resp.status == 404:
        msg = (f"没有找到订单 {order_id}，请核对订单号。" if ctx.lang == "zh"
               else f"I couldn't find order {order_id}. Please check the number.")
        return {"found": False, "order_id": order_id, "message": msg}
    if not resp.ok:
        raise RuntimeError(f"the CRM answered HTTP {resp.status}")
    order = resp.json()
    status = str(order.get("status", "unknown"))
    parts_zh = [f"订单 {order_id} 的状态：{_STATUS_ZH.get(status, status)}"]
    parts_en = [f"Order {order_id} is {status}"]
    if order.get("carrier") and order.get("tracking_no"):
        parts_zh.append(f"物流：{order['carrier']}，运单号 {order['tracking_no']}")
        parts_en.append(f"shipped with {order['carrier']}, tracking number {order['tracking_no']}")
    if order.get("eta"):
        parts_zh.append(f"预计 {order['eta']} 送达")
        parts_en.append(f"expected on {order['eta']}")
    message = "，".join(parts_zh) + "。" if ctx.lang == "zh" else ", ".join(parts_en) + "."
    return {"found": True, "order_id": order_id, "status": status, "order": order, "message": message}


async def customer_lookup(ctx, phone):
    base = ctx.settings["base_url"].rstrip("/")
    resp = await ctx.http.get(f"{base}/customers?phone={quote(phone)}", headers=_headers(ctx))
    if resp.status == 404:
        return {"found": False, "message": "没有找到该客户。" if ctx.lang == "zh" else "No customer with that number."}
    if not resp.ok:
        raise RuntimeError(f"the CRM answered HTTP {resp.status}")
    customer = resp.json()
    name = customer.get("name", "")
    tier = customer.get("tier", "")
    message = (f"客户：{name}，会员等级：{tier}。" if ctx.lang == "zh" else f"Customer {name}, member tier {tier}.")
    return {"found": True, "customer": customer, "message": message}
