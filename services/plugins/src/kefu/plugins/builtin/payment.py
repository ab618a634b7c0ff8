"""Refund requests for orders (side-effecting: runs only after the visitor confirms, in a turn of its own).

Settings per tenant: ``base_url`` of the payment/after-sales API (on KEFU_PLUGINS_ALLOWED_HOSTS) and an
optional ``api_key``. The API takes ``POST {base_url}/refunds`` with ``{"order_id", "reason",
"idempotency_key"}`` and answers ``{"refund_id", "status"}``; the idempotency key is the call id, so a
retried call never creates a second refund.
"""

MANIFEST = {
    "name": "payment",
    "version": "1.0.0",
    "description": "Creates refund requests",
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
            "name": "create_refund",
            "description": "Ask for a refund of an order",
            "side_effecting": True,
            "confirmation": "visitor",
            "timeout_s": 8,
            "rate_per_minute": 20,
            "confirm_zh": "确认要为订单 {order_id} 申请退款吗？请回复“确认”继续，或“取消”放弃。",
            "confirm_en": "Shall I request a refund for order {order_id}? Reply \"yes\" to go ahead or \"no\" to cancel.",
            "arguments": {"type": "object", "required": ["order_id"],
                          "properties": {"order_id": {"type": "string", "pattern": "^[A-Za-z0-9-]{6,32}$"},
                                         "reason": {"type": "string", "maxLength": 500}}},
        },
    ],
    "intents": [
        {
            "tool": "create_refund",
            # Requests, not questions about refunds ("退款多久到账？" is answered from the knowledge base).
            "keywords": ["我要退款", "申请退款", "要退款", "想退款", "给我退款", "帮我退款", "办理退款", "退款申请",
                         "want a refund", "request a refund", "refund my order", "refund order", "refund for order",
                         "refund for my", "money back for"],
            "examples": ["订单 20261124001 我要退款", "I want a refund for order 20261124001"],
            "slot_arguments": {"order_id": "order_id"},
            "ask_zh": "请告诉我需要退款的订单号。",
            "ask_en": "Which order should I request the refund for? Please give me the order number.",
        },
    ],
}


async def create_refund(ctx, order_id, reason=""):
    base = ctx.settings["base_url"].rstrip("/")
    key = ctx.settings.get("api_key")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    resp = await ctx.http.post(f"{base}/refunds", json={"order_id": order_id, "reason": reason,
                                                         "idempotency_key": ctx.call_id}, headers=headers)
    if resp.status == 404:
        msg = (f"没有找到订单 {order_id}，无法申请退款。" if ctx.lang == "zh"
               else f"I couldn't find order {order_id}, so no refund was requested.")
        return {"created": False, "order_id": order_id, "message": msg}
    if not resp.ok:
        raise RuntimeError(f"the payment API answered HTTP {resp.status}")
    refund = resp.json()
    rid = refund.get("refund_id", "")
    msg = (f"已为订单 {order_id} 提交退款申请，退款单号 {rid}，我们会尽快处理。" if ctx.lang == "zh"
           else f"I've requested a refund for order {order_id} (refund {rid}). We'll process it shortly.")
    return {"created": True, "order_id": order_id, "refund": refund, "message": msg}
